"""The run-time choice on CPU between the project's kernels and ATen's conv2d + batch_norm + relu
(resnext_kernels/_cpu_backend.py): the faster runs and is kept per problem, explain() reports it, the timing runs
leave the caller's tensors alone, RESNEXT_KERNELS_CPU_BACKEND forces one, deterministic algorithms take ours untimed,
torch.compile keeps an eager choice; and both choices give float64-exact results in inference and training.

The rest of the suite runs with the choice forced to ours (conftest.py), so that each kernel path is tested by the
planner's rules whatever this machine's oneDNN measures."""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import FP32_TOL, random_bn, reference_conv_bn_relu, reference_train, rel_err
from torch import nn

import resnext_kernels as rk
from resnext_kernels import _cpu_backend

ENV = _cpu_backend.BACKEND_ENV


@pytest.fixture(autouse=True)
def _auto_choice(monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    _cpu_backend.clear()
    yield
    _cpu_backend.set_fake_times(None)
    _cpu_backend.clear()


def _scopes(fn):
    """The resnext_kernels profiler scopes fn opened."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("resnext_kernels::")}


def _layer(c=64, hw=10, n=2, groups=8):
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c // groups, 3, 3) * 0.2
    return x, w, *random_bn(c)


@pytest.mark.parametrize("ours_ms,aten_ms,expected", [(1.0, 2.0, "ours"), (2.0, 1.0, "aten"), (1.0, 0.96, "ours")])
def test_the_faster_runs_and_is_kept(ours_ms, aten_ms, expected):
    x, w, mean, var, gamma, beta = _layer()
    assert rk.explain(x, w, groups=8).backend is None  # not timed before the first call
    _cpu_backend.set_fake_times(ours_ms, aten_ms)
    out = []
    scopes = _scopes(lambda: out.append(rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8)))
    assert ("resnext_kernels::aten" in scopes) == (expected == "aten")
    assert bool(scopes - {"resnext_kernels::aten"}) == (expected == "ours")  # ours opens its kernel's scope
    decision = rk.explain(x, w, groups=8)
    assert decision.backend == expected and f"{ours_ms:.3f} ms" in decision.reason
    assert f"{aten_ms:.3f} ms" in decision.reason  # within 5%, ours is kept
    assert rel_err(out[0], reference_conv_bn_relu(x, w, mean, var, gamma, beta, 1e-5, 1, 1, 1, 8)) < FP32_TOL
    assert _cpu_backend.timed() == 1
    rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8)  # the same problem: not timed again
    assert _cpu_backend.timed() == 1
    rk.conv_bn_relu(x[:1], w, mean, var, gamma, beta, groups=8)  # another batch size: a new problem
    rk.conv_bn_relu(x.contiguous(), w, mean, var, gamma, beta, groups=8)  # another layout: a new problem
    assert _cpu_backend.timed() == 3
    assert rk.explain(x, w, groups=8, relu=False).backend is None  # without the ReLU: another problem


@pytest.mark.parametrize("expected", ["ours", "aten"])
def test_training_step_either_way_matches_float64(expected):
    """A module's training step with the choice made either way: output, every gradient, the running statistics
    (updated once per step, never by the timing runs) and the step counter, against float64."""
    x, w, *_ = _layer()
    _cpu_backend.set_fake_times(*((1.0, 2.0) if expected == "ours" else (2.0, 1.0)))
    layer = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=8)
    layer.conv.weight.data.copy_(w)
    ref_bn = copy.deepcopy(layer.bn).double()
    xr = x.clone().requires_grad_()
    grad = torch.randn(2, 64, 10, 10)
    out = layer(xr)
    out.backward(grad)
    assert layer.explain(xr).backend == expected and _cpu_backend.timed() == 1
    ref_out, _, _, ref_grads = reference_train(x, w, layer.bn.weight, layer.bn.bias, grad, groups=8)
    ref_bn.train()(F.conv2d(x.double(), w.double(), None, 1, 1, 1, 8))  # the running-statistics reference
    assert rel_err(out, ref_out) < FP32_TOL
    for got, ref in zip((xr.grad, layer.conv.weight.grad, layer.bn.weight.grad, layer.bn.bias.grad), ref_grads):
        assert rel_err(got, ref) < FP32_TOL
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(layer.bn, name), getattr(ref_bn, name)) < FP32_TOL
    assert int(layer.bn.num_batches_tracked) == 1


def test_eval_with_autograd_aten_choice_gradients():
    """Inference form under autograd (BatchNorm frozen, e.g. fine-tuning) with ATen chosen: input and weight
    gradients against float64."""
    x, w, mean, var, gamma, beta = _layer()
    _cpu_backend.set_fake_times(2.0, 1.0)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = rk.conv_bn_relu(xr, wr, mean, var, gamma, beta, groups=8)
    grad = torch.randn_like(out)
    out.backward(grad)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = reference_conv_bn_relu(xd, wd, mean, var, gamma, beta, 1e-5, 1, 1, 1, 8)
    ref.backward(grad.double())
    assert rk.explain(xr, wr, groups=8).backend == "aten"
    assert rel_err(out, ref.detach()) < FP32_TOL
    assert rel_err(xr.grad, xd.grad) < FP32_TOL and rel_err(wr.grad, wd.grad) < FP32_TOL


def test_real_timing_picks_one_and_keeps_it():
    """Without injected times: the first call times both for real and every later call runs the same backend."""
    x, w, mean, var, gamma, beta = _layer()
    out1 = rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8)
    decision = rk.explain(x, w, groups=8)
    assert decision.backend in ("ours", "aten") and "timed on the first call" in decision.reason
    assert decision.params  # the planner's kernel is still named
    out2 = rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8)
    assert _cpu_backend.timed() == 1 and torch.equal(out1, out2)


def test_forced_backend_deterministic_mode_and_bad_value(monkeypatch):
    x, w, mean, var, gamma, beta = _layer()
    _cpu_backend.set_fake_times(1.0, 2.0)  # ours faster: forcing ATen must still take ATen
    monkeypatch.setenv(ENV, "aten")
    assert "resnext_kernels::aten" in _scopes(lambda: rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8))
    assert rk.explain(x, w, groups=8).backend == "aten"
    monkeypatch.setenv(ENV, "ours")
    _cpu_backend.set_fake_times(2.0, 1.0)
    assert "resnext_kernels::aten" not in _scopes(lambda: rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8))
    assert _cpu_backend.timed() == 0
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(ValueError, match="must be ours, aten or auto"):
        rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8)
    monkeypatch.setenv(ENV, "auto")
    torch.use_deterministic_algorithms(True)
    try:
        assert "resnext_kernels::aten" not in _scopes(lambda: rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8))
        assert _cpu_backend.timed() == 0
        assert "deterministic" in rk.explain(x, w, groups=8).reason
    finally:
        torch.use_deterministic_algorithms(False)


def test_compile_keeps_the_eager_choice_and_never_times(monkeypatch):
    x, w, mean, var, gamma, beta = _layer()
    _cpu_backend.set_fake_times(2.0, 1.0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm.forward

    def layer(inp):
        return rk.conv_bn_relu(inp, w, mean, var, gamma, beta, groups=8)

    with torch.no_grad():
        layer(x)  # eager: ATen chosen for this problem
        compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)
        out = compiled(x)
        x1 = x[:1].contiguous(memory_format=torch.channels_last)
        out1 = compiled(x1)  # a problem not timed eagerly: ATen's sequence, for Inductor, untimed
    ours = "resnext_kernels.conv_bn_relu_infer"
    assert len(graphs) == 2 and not any(ours in g for g in graphs), graphs
    monkeypatch.setenv(ENV, "ours")  # a trace-time constant: seen by a new trace
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)(x1)
    assert ours in graphs[2]
    assert _cpu_backend.timed() == 1
    for got, inp in ((out, x), (out1, x1)):
        assert rel_err(got, reference_conv_bn_relu(inp, w, mean, var, gamma, beta, 1e-5, 1, 1, 1, 8)) < FP32_TOL


def test_sequential_equivalence_of_the_aten_route():
    """The ATen route is exactly PyTorch's eager Conv2d -> BatchNorm2d -> ReLU (same ops, same order): the training
    module's output and running statistics, and the functional inference form, bit for bit."""
    x, w, mean, var, gamma, beta = _layer()
    _cpu_backend.set_fake_times(2.0, 1.0)
    layer = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=8)
    eager = nn.Sequential(nn.Conv2d(64, 64, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    eager.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for _ in range(2):  # the first call decides, the second takes the module's cached route
            assert torch.equal(layer(x), eager(x))
        assert torch.equal(layer.bn.running_var, eager[1].running_var)
        assert int(layer.bn.num_batches_tracked) == 2
        out = rk.conv_bn_relu(x, w, mean, var, gamma, beta, groups=8)
        assert torch.equal(out, F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1, 1, 8), mean, var, gamma, beta)))


@pytest.mark.parametrize("channels_last", [True, False])
def test_prepared_layer_inference_takes_the_fastest(channels_last):
    """A layer in eval mode without autograd runs with prepared weights: the fastest of the fused kernel, prepacked
    oneDNN and ATen's convolution with BatchNorm folded, timed on the first call at each size and layout, then kept;
    float64-exact."""
    x, w, mean, var, gamma, beta = _layer()
    x = x if channels_last else x.contiguous()
    layer = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=8).eval()
    layer.conv.weight.data.copy_(w)
    for name, t in zip(("running_mean", "running_var", "weight", "bias"), (mean, var, gamma, beta)):
        getattr(layer.bn, name).data.copy_(t)
    with torch.no_grad():
        if rk.nn._prepacked.unavailable(x) is not None:
            pytest.skip(rk.nn._prepacked.unavailable(x))
        assert "not timed yet" in layer.explain(x).reason
        out1, out2 = layer(x), layer(x)
        decision = layer.explain(x)
    assert decision.backend in ("fused", "onednn_prepacked", "aten_folded")
    assert "prepared inference" in decision.reason
    assert torch.equal(out1, out2) and out1.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(out1, reference_conv_bn_relu(x, w, mean, var, gamma, beta, 1e-5, 1, 1, 1, 8)) < FP32_TOL
    layer.train()  # drops the prepared weights
    assert "_prepared" not in layer.__dict__


@pytest.mark.parametrize("mode", ["auto", "ours"])
def test_prepared_layer_times_the_folded_convolution_not_eagers_sequence(monkeypatch, mode):
    """The prepared layer times the fused kernel, prepacked oneDNN and the folded convolution, never ATen's unfolded
    sequence (the folded convolution plus a pass: it could win only by a noisy timing); explain() reports the choice
    in the mode it was made in; forcing ATen runs the sequence untimed."""
    x = _layer()[0]
    layer = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=8).eval()
    if rk.nn._prepacked.unavailable(x) is not None:
        pytest.skip(rk.nn._prepacked.unavailable(x))
    monkeypatch.setenv(ENV, mode)
    timed = []

    def fake_times(candidates):
        timed.append(sorted(candidates))
        return {name: 1.0 + (name != "aten_folded") for name in candidates}

    monkeypatch.setattr(rk.nn._prepacked, "time_candidates", fake_times)
    with torch.no_grad():
        assert "not timed yet" in layer.explain(x).reason
        out = layer(x)
        assert timed == [["aten_folded", "fused", "onednn_prepacked"]]
        assert layer.explain(x).backend == "aten_folded"
        monkeypatch.setenv(ENV, "aten")
        assert layer.explain(x).backend == "aten"
        assert "resnext_kernels::aten" in _scopes(lambda: layer(x))
        assert len(timed) == 1
        assert rel_err(layer(x), out) < FP32_TOL


def test_prepared_layer_later_calls_follow_changes(monkeypatch):
    """A layer's later calls skip the checks only while nothing they stand for changed: a weight changed in place,
    grad mode with an input that requires grad, a forced path, another layout, each take effect at the next call."""
    x, w, mean, var, gamma, beta = _layer()
    layer = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=8).eval()
    layer.conv.weight.data.copy_(w)
    for name, t in zip(("running_mean", "running_var", "weight", "bias"), (mean, var, gamma, beta)):
        getattr(layer.bn, name).data.copy_(t)
    if rk.nn._prepacked.unavailable(x) is not None:
        pytest.skip(rk.nn._prepacked.unavailable(x))

    def ref(inp, weight=w):
        return reference_conv_bn_relu(inp, weight, mean, var, gamma, beta, 1e-5, 1, 1, 1, 8)

    with torch.no_grad():
        layer(x)
        assert "_fast" in layer.__dict__ and rel_err(layer(x), ref(x)) < FP32_TOL
        layer.conv.weight.mul_(2)  # in place: the version changes
        assert rel_err(layer(x), ref(x, 2 * w)) < FP32_TOL
        layer.conv.weight.div_(2)
        nchw = x.contiguous()
        out = layer(nchw)
        assert out.is_contiguous() and rel_err(out, ref(nchw)) < FP32_TOL
        monkeypatch.setenv(ENV, "aten")
        assert "resnext_kernels::aten" in _scopes(lambda: layer(nchw))
        monkeypatch.setenv(ENV, "auto")
    xr = x.clone().requires_grad_()
    out = layer(xr)
    out.sum().backward()  # with autograd: the op's path, which records the graph
    assert xr.grad is not None and rel_err(out, ref(x)) < FP32_TOL
