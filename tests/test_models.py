"""The aggregated bottleneck, the drop-in blocks and the model family, against torchvision."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from reference import assert_close_to_reference, rel_err
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import resnext_kernels as rk
from resnext_kernels import _prepacked
from resnext_kernels.models import FusedPreActBottleneck

IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                   "resnext101_32x8d", "resnext101_64x4d"]


def _randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_models_load_torchvision_and_match_in_eval(name, channels_last):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)()
    _randomize_bn(ref)
    ours = getattr(rk.models, name)()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad():
        out = ours(x)  # prepares the weights (ours(x) again: the prepared path as timed calls run it)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            again = ours(x)
        assert_close_to_reference(out, ref.double()(x.double()), what="logits")
    assert out.is_contiguous() and torch.equal(out, again)  # (N, classes) logits
    bottlenecks = any(isinstance(m, rk.nn.FusedResNeXtBlock) for m in ours.modules())
    if bottlenecks and _prepacked.unavailable(x) is None:
        assert "onednn_prepacked" in _scopes(prof, {"onednn_prepacked"})


def test_parameter_counts():
    assert sum(p.numel() for p in rk.models.resnext50_32x4d().parameters()) == 25_028_904
    assert sum(p.numel() for p in rk.models.resnet50().parameters()) == 25_557_032
    # Table 7 of the paper: ResNeXt-29 8x64d 34.4M, 16x64d 68.1M parameters (CIFAR-10 classifier)
    assert round(sum(p.numel() for p in rk.models.resnext29_8x64d().parameters()) / 1e6, 1) == 34.4
    assert abs(sum(p.numel() for p in rk.models.resnext29_16x64d().parameters()) / 1e6 - 68.1) < 0.1


def _train_step(model, x, target):
    model.train()
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    return loss


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d"])
def test_training_step_matches_torchvision_float64(name, channels_last):
    """One training step in float64: loss, every parameter gradient and every BN buffer as torchvision's."""
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(num_classes=10).double()
    ours = getattr(rk.models, name)(num_classes=10).double()
    ours.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (4,))
    torch.testing.assert_close(_train_step(ours, x, target), _train_step(ref, x, target), rtol=1e-10, atol=0)
    for (name_, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        assert rel_err(p_ours.grad, p_ref.grad) < 1e-9, name_
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", [m for m in IMAGENET_MODELS if m not in ("resnet18", "resnext50_32x4d")])
def test_training_step_matches_torchvision_float64_every_constructor(name):
    """The other constructors (deeper, wider, BasicBlock) at a small input: the same float64 training step."""
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(num_classes=10).double()
    ours = getattr(rk.models, name)(num_classes=10).double()
    ours.load_state_dict(ref.state_dict())
    # 4 images of 48x48 (as above): the last stage's BatchNorms see 16 values per channel. With fewer (2 per
    # channel at 2 x 32x32) the normalization is so badly conditioned that float64 rounding of either
    # implementation is amplified to 1e-4 in the loss.
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    target = torch.tensor([3, 8, 0, 5])
    torch.testing.assert_close(_train_step(ours, x, target), _train_step(ref, x, target), rtol=1e-10, atol=0)
    worst = max(rel_err(p_ours.grad, p_ref.grad) for p_ref, p_ours in zip(ref.parameters(), ours.parameters()))
    assert worst < 1e-8
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-10, atol=1e-12, msg=key)


def test_training_step_float32_error_within_torchvision_own():
    """In float32 a deep net's gradients drift from the exact ones; ours must drift no more than
    torchvision's own float32 step (both measured against a float64 step)."""
    torch.manual_seed(0)
    truth = torchvision.models.resnext50_32x4d(num_classes=10).double()
    ref = torchvision.models.resnext50_32x4d(num_classes=10)
    ours = rk.models.resnext50_32x4d(num_classes=10)
    ref.load_state_dict(truth.state_dict())
    ours.load_state_dict(truth.state_dict())
    x = torch.randn(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (4,))
    _train_step(truth, x.double(), target)
    _train_step(ref, x, target)
    _train_step(ours, x, target)

    def err(a, b):
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()

    for (name_, p_truth), p_ref, p_ours in zip(truth.named_parameters(), ref.parameters(), ours.parameters()):
        assert err(p_ours.grad, p_truth.grad) <= 2 * err(p_ref.grad, p_truth.grad) + 1e-5, name_


def test_zero_init_residual_like_torchvision():
    ref = torchvision.models.resnext50_32x4d(zero_init_residual=True)
    ours = rk.models.resnext50_32x4d(zero_init_residual=True)
    zeroed = [k for k, v in ref.state_dict().items() if k.endswith("bn3.weight") and (v == 0).all()]
    assert len(zeroed) == 16  # one per bottleneck (3 + 4 + 6 + 3)
    assert all((ours.state_dict()[k] == 0).all() for k in zeroed)
    nonzero = [k for k in ours.state_dict() if k.endswith(".weight") and k not in zeroed and "bn" in k]
    assert nonzero and all((ours.state_dict()[k] != 0).any() for k in nonzero)
    basic = [m for m in rk.models.resnet18(zero_init_residual=True).modules() if isinstance(m, rk.nn.FusedBasicBlock)]
    assert len(basic) == 8 and all((m.bn2.weight == 0).all() for m in basic)


# --------------------------------------------------------------------------------------------------
# The block and its single-op inference form
# --------------------------------------------------------------------------------------------------

BLOCK_CASES = [  # (inplanes, planes, stride, groups, base_width, dilation, projection)
    (64, 16, 1, 1, 64, 1, True),
    (64, 16, 1, 4, 16, 1, False),
    (128, 32, 2, 32, 4, 1, True),
    (64, 16, 1, 2, 32, 2, False),
    (32, 16, 2, 16, 4, 1, True),
]


def _block_pair(case, dtype=torch.float32):
    inplanes, planes, stride, groups, base_width, dilation, projection = case
    down = None
    if projection:
        down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    ref = Bottleneck(inplanes, planes, stride, down, groups, base_width, dilation)
    _randomize_bn(ref)
    down2 = None
    if projection:
        down2 = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
    ours = rk.nn.FusedResNeXtBlock(inplanes, planes, stride, down2, groups, base_width, dilation)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype).eval(), ours.to(dtype).eval()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_single_op_inference(case, channels_last):
    ref, ours = _block_pair(case, torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, case[0], 9, 8, dtype=torch.float64).contiguous(memory_format=fmt)
    before = x.clone()
    with torch.no_grad():
        assert ours.explain(x).path == "block"
        out = ours(x)
        assert rel_err(out, ref(x)) < 1e-12
    assert out.is_contiguous(memory_format=fmt) and torch.equal(x, before)


def test_block_single_op_bfloat16_and_autocast():
    """The single-op block in bfloat16, and under CPU autocast, against float64 within a small multiple of
    torchvision's own error in the same precision."""
    ref, ours = _block_pair(BLOCK_CASES[2])
    x = torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())
        own = copy.deepcopy(ref).bfloat16()(x.bfloat16())
        assert_close_to_reference(copy.deepcopy(ours).bfloat16()(x.bfloat16()), expected, own, "bfloat16 block")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, own = ours(x), ref(x)
    assert out.dtype == own.dtype == torch.bfloat16
    assert_close_to_reference(out, expected, own, "autocast block output")


# Blocks whose convolutions take the CPU routes of bottleneck_infer, with the route each convolution takes on a CPU
# with AVX-512 or AVX2 (conv1, conv2, the projection, conv3 with the shortcut and the final ReLU in its epilogue).
CPU_ROUTE_BLOCKS = {
    "winograd-onednn_residual": (256, 64, 1, 8, 16, 1, False),  # onednn_1x1, winograd_f4x4, onednn_1x1
    "stride2-onednn_projection": (256, 64, 2, 8, 16, 1, True),  # onednn_1x1, broadcast, onednn_1x1, onednn_1x1
    "lanes-own_residual": (64, 16, 1, 4, 16, 1, True),  # broadcast, lanes, broadcast, broadcast
}
_CPU_PATH_SCOPES = {"onednn_1x1", "onednn_large_block", "onednn_intel", "winograd_f4x4", "winograd_f2x2", "lanes",
                    "broadcast", "expand", "generic"}


def _bn_args(bn):
    return bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps


def _block_conv_kernels(ours, x):
    """The kernel explain() names for each of the block's convolutions, in bottleneck_infer's order."""
    n, _, h, w = x.shape
    s, width = ours.conv2.stride[0], ours.conv2.in_channels
    convs = [(ours.conv1, x), (ours.conv2, torch.empty(n, width, h, w, dtype=x.dtype))]
    if ours.downsample is not None:
        convs.append((ours.downsample[0], x))
    convs.append((ours.conv3, torch.empty(n, width, (h - 1) // s + 1, (w - 1) // s + 1, dtype=x.dtype)))
    return [rk.explain(inp, conv.weight.detach(), stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                       groups=conv.groups, requires_grad=False).kernel for conv, inp in convs]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CPU_ROUTE_BLOCKS)
def test_block_op_cpu_routes_match_torchvision_float64(name, dtype, channels_last):
    """The CPU bottleneck_infer op (the block's path where the prepared one is not available) in float32 and bfloat16 against torchvision's Bottleneck in float64: each
    convolution runs the kernel explain() names (its profiler scope), and the routes above are reached on a CPU with
    vector kernels and the oneDNN routes on (the AMD rules: the Intel ones send more to oneDNN)."""
    case = CPU_ROUTE_BLOCKS[name]
    ref, ours = _block_pair(case, torch.float64)
    ours = ours.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, case[0], 10, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    layers = [(conv.weight, *_bn_args(bn)) for conv, bn in ((ours.conv1, ours.bn1), (ours.conv2, ours.bn2),
                                                             (ours.conv3, ours.bn3))]
    down = (ours.downsample[0].weight, *_bn_args(ours.downsample[1])) if ours.downsample is not None else None
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = rk.ops.bottleneck_inference(x.to(dtype), layers, down, stride=case[2], groups=case[3], dilation=1)
        expected = ref(x)
        own = copy.deepcopy(ref).to(dtype)(x.to(dtype)) if dtype != torch.float32 else None
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    ran = [e.name.split("::", 1)[1] for e in events if e.name.startswith("resnext_kernels::") and
           e.name.split("::", 1)[1] in _CPU_PATH_SCOPES]
    assert "resnext_kernels::bottleneck_infer" in {e.name for e in events}
    assert ran == _block_conv_kernels(ours, x.to(dtype))
    config = rk.ops.cpu_config()
    if config.isa != "baseline" and config.aten_routes and config.vendor == "amd":
        routes = {"winograd-onednn_residual": ["onednn_1x1", "winograd_f4x4", "onednn_1x1"],
                  "stride2-onednn_projection": ["onednn_1x1", "broadcast", "onednn_1x1", "onednn_1x1"],
                  "lanes-own_residual": ["broadcast", "lanes", "broadcast", "broadcast"]}
        if dtype == torch.float32 or config.native_bf16:  # bfloat16 takes oneDNN where the CPU multiplies it
            assert ran == routes[name]
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
    assert_close_to_reference(out, expected, own, f"{name} block")


def _scopes(prof, names):
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return [e.name.split("::", 1)[1] for e in events if e.name.startswith("resnext_kernels::") and
            e.name.split("::", 1)[1] in names]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", CPU_ROUTE_BLOCKS)
def test_block_prepared_inference_matches_torchvision_float64(name, dtype, channels_last, batch):
    """The block's prepared CPU inference (BatchNorm folded, the 1x1 convolutions prepacked for oneDNN with their
    epilogues in its post-ops, the grouped 3x3 by the fused kernel) against torchvision's Bottleneck in float64:
    the scopes show which ran, the output keeps the input's layout."""
    case = CPU_ROUTE_BLOCKS[name]
    ref, ours = _block_pair(case, torch.float64)
    ours = ours.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, case[0], 10, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    with torch.no_grad():
        decision = ours.explain(x.to(dtype))
    if rk.ops.cpu_config().aten_routes and (dtype == torch.float32 or rk.ops.cpu_config().native_bf16):
        assert decision.kernel == "onednn_prepacked", decision
    else:
        pytest.skip(f"no prepared path here: {decision.reason}")
    with torch.no_grad():
        out = ours(x.to(dtype))  # prepares, and times the 3x3 convolution's two implementations at this size
        expected = ref(x)
        own = copy.deepcopy(ref).to(dtype)(x.to(dtype)) if dtype != torch.float32 else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            again = ours(x.to(dtype))
        reason = ours.explain(x.to(dtype)).reason
    choice = _prepacked.conv2_choice(ours, x.to(dtype))
    assert choice in ("fused", "onednn_prepacked") and reason.endswith(choice)
    kernels = _block_conv_kernels(ours, x.to(dtype))
    conv2 = kernels[1] if choice == "fused" else "onednn_prepacked"
    pointwise = ["onednn_prepacked"] * (len(kernels) - 1)
    assert _scopes(prof, _CPU_PATH_SCOPES | {"onednn_prepacked"}) == pointwise[:1] + [conv2] + pointwise[1:]
    assert out.dtype == dtype and out.is_contiguous(memory_format=fmt) and torch.equal(out, again)
    assert_close_to_reference(out, expected, own, f"{name} block")
    x_in = x.to(dtype)
    before = x_in.clone()
    with torch.no_grad():
        ours(x_in)
    assert torch.equal(x_in, before)  # a block called alone never writes over its input


def test_model_inference_overwrites_only_its_own_intermediates(monkeypatch):
    """In CPU inference a model lets each bottleneck write its output over its input (an intermediate of the
    forward), but never over the caller's tensor, and not while a hook could hold a block's input or output: then the
    tensors the hooks saw keep torchvision's values."""
    torch.manual_seed(0)
    ref = torchvision.models.resnext50_32x4d()
    _randomize_bn(ref)
    ours = rk.models.resnext50_32x4d()
    ours.load_state_dict(ref.state_dict())
    ref.eval()
    ours.eval()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    if _prepacked.unavailable(x) is not None:
        pytest.skip(_prepacked.unavailable(x))
    consumed = []
    real = _prepacked.bottleneck_forward

    def spy(block, inp, consume=False):
        consumed.append(consume)
        return real(block, inp, consume)

    monkeypatch.setattr(_prepacked, "bottleneck_forward", spy)
    before = x.clone()
    with torch.no_grad():
        out = ours(x)
        assert consumed == [True] * 16 and torch.equal(x, before)
        assert_close_to_reference(out, ref.double()(x.double()), what="logits")
        handle = ours.maxpool.register_forward_hook(lambda module, args, output: None)  # sees the first input
        consumed.clear()
        ours(x)
        handle.remove()
        assert consumed == [False] * 16

        def keep(outputs):
            return lambda module, args, output: outputs.append(output)

        seen = {}
        for name, model in (("ours", ours), ("torchvision", ref)):
            seen[name] = []
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
                for block in layer:
                    block.register_forward_hook(keep(seen[name]))
        consumed.clear()
        ours(x)
        ref.double()(x.double())
    assert consumed == [False] * 16
    for i, (mine, theirs) in enumerate(zip(seen["ours"], seen["torchvision"], strict=True)):
        assert_close_to_reference(mine, theirs, what=f"block {i}'s output as its hook saw it")


def test_block_prepared_weights_follow_the_parameters():
    """The prepared weights are rebuilt when a weight or BatchNorm tensor changes in place or is replaced, and when
    the dtype changes; a copy and a pickled block prepare their own; train() and eval() drop them."""
    ref, ours = _block_pair(CPU_ROUTE_BLOCKS["stride2-onednn_projection"], torch.float64)
    ours = ours.float()
    x = torch.randn(1, 256, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        prepared = ours.explain(x.float()).kernel == "onednn_prepacked"
    if not prepared:
        pytest.skip("no prepared path here")

    def check(block, dtype=torch.float32):
        with torch.no_grad():
            want, own = ref(x), copy.deepcopy(ref).to(dtype)(x.to(dtype)) if dtype != torch.float32 else None
            assert_close_to_reference(block(x.to(dtype)), want, own)

    check(ours)
    with torch.no_grad():
        for block in (ref, ours):  # in place: the version counters move
            block.conv3.weight.mul_(1.5)
            block.downsample[1].running_var.mul_(2.0)
            block.bn2.bias.add_(0.25)
    check(ours)
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours.load_state_dict(state)
    check(ours)
    ours.conv1.weight = nn.Parameter(ours.conv1.weight.detach() * -1)  # replaced
    with torch.no_grad():
        ref.conv1.weight.mul_(-1)
    check(ours)
    check(copy.deepcopy(ours))
    check(pickle.loads(pickle.dumps(ours)))
    assert "_prepared" in ours.__dict__
    ours.train()
    assert "_prepared" not in ours.__dict__
    ours.eval()
    check(ours)
    for block in (ref, ours):  # .data has its own version counter: eval() drops the prepared weights
        block.conv2.weight.data.mul_(0.5)
    ours.eval()
    check(ours)
    check(ours.bfloat16(), torch.bfloat16)


@pytest.mark.parametrize("case", [BLOCK_CASES[2], CPU_ROUTE_BLOCKS["winograd-onednn_residual"]],
                         ids=["lanes-projection", "winograd-identity"])
def test_block_training_step_matches_torchvision_float64(case):
    """A float32 training step of FusedResNeXtBlock (the per-layer fused ops: the single-op block is inference only)
    against torchvision's Bottleneck in float64: the output, the input gradient, every parameter gradient and the
    running statistics, within the suite's float32 rule (3x torchvision's own float32 error where that is larger)."""
    ref, ours = _block_pair(case)
    truth = copy.deepcopy(ref).double()
    x = torch.randn(2, case[0], 8, 8).contiguous(memory_format=torch.channels_last)
    assert ours.explain(x).path == "layers"  # parameters require grad
    grad = torch.randn(2, case[1] * 4, 8 // case[2], 8 // case[2])
    steps = []
    for block, dtype in ((truth, torch.float64), (ref, torch.float32), (ours, torch.float32)):
        block.train()
        xi = x.to(dtype).requires_grad_()
        out = block(xi)
        out.backward(grad.to(dtype))
        steps.append({"output": out.detach(), "input.grad": xi.grad,
                      **{f"{k}.grad": p.grad for k, p in block.named_parameters()},
                      **{k: b for k, b in block.named_buffers() if b.is_floating_point()}})
    want, own, got = steps
    assert all(p.grad is not None for p in ours.parameters()) and "bn2.running_var" in want
    for name, w in want.items():
        assert_close_to_reference(got[name], w, rel_err(own[name], w), name)


def test_block_op_opcheck_and_compile():
    _, ours = _block_pair(BLOCK_CASES[2])
    x = torch.randn(2, 128, 8, 8).contiguous(memory_format=torch.channels_last)
    folded = []
    for conv, bn in ((ours.conv1, ours.bn1), (ours.conv2, ours.bn2), (ours.conv3, ours.bn3),
                     (ours.downsample[0], ours.downsample[1])):
        folded += [conv.weight.detach(), *rk.ops.fold_batch_norm(bn.running_mean, bn.running_var, bn.weight.detach(),
                                                                 bn.bias.detach(), bn.eps, torch.float32)]
    torch.library.opcheck(torch.ops.resnext_kernels.bottleneck_infer, (x, *folded, 2, 32, 1))
    with torch.no_grad():
        compiled = torch.compile(ours, fullgraph=True)
        torch.testing.assert_close(compiled(x), ours(x))


def test_block_rejects_other_norm_layers():
    with pytest.raises(ValueError, match="nn.BatchNorm2d"):
        rk.nn.FusedResNeXtBlock(64, 16, norm_layer=lambda c: nn.GroupNorm(4, c))


# --------------------------------------------------------------------------------------------------
# convert_model, the CIFAR ResNeXt and the pre-activation block
# --------------------------------------------------------------------------------------------------

def test_convert_model_torchvision():
    torch.manual_seed(0)
    ref = torchvision.models.resnext50_32x4d()
    _randomize_bn(ref)
    model = torchvision.models.resnext50_32x4d()
    model.load_state_dict(ref.state_dict())
    model.layer2[0].bn1 = nn.GroupNorm(4, model.layer2[0].bn1.num_features)  # not convertible: left alone
    keys = list(model.state_dict())
    fast, report = rk.convert_model(model, return_report=True)
    assert fast is model and len(report.converted) == 15
    assert report.skipped == [("layer2.0", "bn1 is GroupNorm, not nn.BatchNorm2d")]
    assert isinstance(model.layer1[0], rk.nn.FusedResNeXtBlock) and isinstance(model.layer2[0], Bottleneck)
    ref.layer2[0].bn1 = model.layer2[0].bn1
    assert list(model.state_dict()) == keys
    ref.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), ref(x).double()) < 1e-4


def test_convert_model_basic_blocks_share_parameters():
    model = torchvision.models.resnet18()
    block = model.layer1[0]
    assert isinstance(block, BasicBlock)
    rk.convert_model(model)
    assert isinstance(model.layer1[0], rk.nn.FusedBasicBlock) and model.layer1[0].conv1 is block.conv1


@pytest.mark.parametrize("name,blocks", [("resnext50_32x4d", 16), ("resnet18", 8)])
def test_convert_model_timm(name, blocks):
    """timm's blocks convert too (same keys); eval outputs and a training step match timm's own model."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=10)
    _randomize_bn(ref)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    model.load_state_dict(ref.state_dict())
    keys = list(model.state_dict())
    fast, report = rk.convert_model(model, return_report=True)
    assert fast is model and len(report.converted) == blocks and not report.skipped
    assert list(model.state_dict()) == keys
    fused_type = rk.nn.FusedResNeXtBlock if blocks == 16 else rk.nn.FusedBasicBlock
    assert isinstance(model.layer1[0], fused_type)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert rel_err(model.eval()(x), ref.eval()(x).double()) < 1e-4
    # A training step in float64 (deep nets amplify float32 rounding through small-batch BatchNorm).
    ref, model, x = ref.double(), model.double(), x.double()
    target = torch.tensor([1, 7])
    losses = [_train_step(m, x, target) for m in (ref, model)]
    assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-10)
    for (key, p_ref), p_ours in zip(ref.named_parameters(), model.parameters()):
        assert rel_err(p_ours.grad, p_ref.grad) < 1e-8, key
    for key, value in ref.state_dict().items():
        if "running" in key:
            assert rel_err(model.state_dict()[key], value) < 1e-10, key


def test_convert_model_timm_leaves_blocks_with_extras():
    timm = pytest.importorskip("timm")
    model = timm.create_model("seresnext26d_32x4d", pretrained=False)
    _, report = rk.convert_model(model, return_report=True)
    assert not report.converted and len(report.skipped) == 8
    assert all(why.startswith("se is ") for _, why in report.skipped)
    assert type(model.layer1[0]).__module__.startswith("timm.")


@pytest.mark.parametrize("zero_init", [False, True])
def test_cifar_resnext_fused_matches_reference_path(zero_init):
    torch.manual_seed(0)
    model = rk.models.CifarResNeXt(cardinality=4, base_width=4, depth=11, stage_planes=(16, 32, 64),
                                   zero_init_residual=zero_init)
    _randomize_bn(model)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        fused = model(x)
        with rk.force_reference():
            expected = model(x)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-4)
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


class _PreActReference(nn.Module):
    """A plain torch.nn pre-activation bottleneck to check FusedPreActBottleneck against."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        f = self.fused
        pre = F.relu(f.bn1(x))
        shortcut = x if f.downsample is None else f.downsample(pre)
        out = f.conv1(pre)
        out = f.conv2(F.relu(f.bn2(out)))
        return f.conv3(F.relu(f.bn3(out))) + shortcut


def test_preact_bottleneck_matches_plain_torch():
    torch.manual_seed(0)
    block = FusedPreActBottleneck(32, 8, stride=2, downsample=nn.Conv2d(32, 32, 1, 2, bias=False), groups=4,
                                  base_width=16)
    _randomize_bn(block)
    ref = _PreActReference(block)
    x = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    block.double()
    block.eval()
    with torch.no_grad():
        assert rel_err(block(x), ref(x)) < 1e-12
    block.train()
    torch.testing.assert_close(block(x), ref(x))
