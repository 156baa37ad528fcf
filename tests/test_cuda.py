"""The fused op on a real CUDA device (skipped without one; the emulated tests cover the same kernel)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda
from reference import assert_close_to_reference, random_bn, reference_conv_bn_relu, rel_err
from test_conv_bn_relu import EDGE_CASES, _make

import resnext_kernels as rk
from resnext_kernels import _build_info

pytestmark = [requires_cuda,
              pytest.mark.skipif(not _build_info.WITH_CUDA, reason="resnext_kernels built without CUDA kernels")]


def _own_error(x, wt, bn, conv_args, ref):
    """PyTorch's own error (cuDNN in the same dtype) on the same problem."""
    stride, padding, dilation, groups = conv_args
    mean, var, gamma, beta = (t.to(x.dtype) for t in bn)
    own = F.relu(F.batch_norm(F.conv2d(x, wt, None, stride, padding, dilation, groups), mean, var, gamma, beta,
                              False, 0.0, 1e-5))
    return rel_err(own, ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "x".join(map(str, c)).replace(" ", ""))
def test_cuda_matches_reference(case, dtype, channels_last):
    x, wt, bn, conv_args = _make(case, dtype, channels_last)
    stride, padding, dilation, groups = conv_args
    x, wt = x.cuda(), wt.cuda()
    mean, var, gamma, beta = (t.cuda() for t in bn)
    decision = rk.explain(x, wt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, stride, padding, dilation, groups)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    err = rel_err(out, ref)
    if dtype == torch.float64:
        assert err <= 1e-12, decision
    elif dtype == torch.float32:
        assert err <= 1e-4, decision
    else:
        assert err <= 2 * _own_error(x, wt, (mean, var, gamma, beta), conv_args, ref) + 2e-3, decision


def test_cuda_resnext_stage_uses_fused_kernel():
    x = torch.randn(2, 256, 28, 28, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(256, 8, 3, 3, device="cuda", dtype=torch.float16) / 8.5
    mean, var, gamma, beta = (t.cuda() for t in random_bn(256))
    assert rk.explain(x, wt, groups=32).path == "cuda"
    out = rk.conv_bn_relu(x, wt, mean, var, gamma, beta, groups=32)
    ref = reference_conv_bn_relu(x, wt, mean, var, gamma, beta, 1e-5, 1, 1, 1, 32)
    assert rel_err(out, ref) < 1e-2


def test_cuda_opcheck_and_compile():
    x = torch.randn(2, 64, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    wt = torch.randn(64, 2, 3, 3, device="cuda")
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    torch.library.opcheck(torch.ops.resnext_kernels.conv_bn_relu_infer,
                          (x, wt, scale, shift, [1, 1], [1, 1], [1, 1], 32, True))
    m = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=32).cuda().eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


def test_cuda_autocast_float16():
    """Under CUDA autocast the fused layer computes in float16: its output against float64 within a small multiple
    of PyTorch's own Conv2d -> BatchNorm2d -> ReLU error under the same autocast."""
    ref = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, 1, 1, groups=32, bias=False), torch.nn.BatchNorm2d(64),
                              torch.nn.ReLU()).cuda().eval()
    m = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=32).cuda().eval()
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 9, 9, device="cuda")
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())
        with torch.autocast("cuda", dtype=torch.float16):
            out, own = m(x), ref(x)
    assert out.dtype == own.dtype == torch.float16
    assert_close_to_reference(out, expected, own, "autocast output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_training_matches_torch_nn(dtype):
    ref = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, 1, 1, groups=32, bias=False), torch.nn.BatchNorm2d(64),
                              torch.nn.ReLU()).cuda().to(dtype)
    ours = rk.nn.FusedGroupedConvBNReLU(64, 64, groups=32).cuda().to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 64, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert ours.explain(x1).path == "cuda"
    y1, y2 = ours(x1), ref(x2)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
    for (name, p1), p2 in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=tol * 10, atol=tol * 10, msg=name)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)
