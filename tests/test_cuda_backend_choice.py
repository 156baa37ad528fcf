"""The run-time choice between the project's CUDA kernels and cuDNN (csrc/cuda/backend_choice.h), through the
emulated ops with injected times (the emulator's own speed means nothing): the faster backend runs and is kept per
problem, RESNEXT_KERNELS_CUDA_BACKEND forces one, deterministic algorithms take ours untimed; and the library path
(csrc/cuda/library_path.h) itself against float64 references, since a user may run it."""


import pytest
import torch
import torch.nn.functional as F
from reference import rel_err

from resnext_kernels import _dispatch, emulator

pytestmark = pytest.mark.skipif(not emulator.available(), reason="resnext_kernels._emu (emulated CUDA) not built")

E = torch.ops.resnext_kernels_emu if emulator.available() else None
ARGS = ([1, 1], [1, 1], [1, 1], 32)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.delenv("RESNEXT_KERNELS_CUDA_BACKEND", raising=False)
    E._backend_reset()
    yield
    E._backend_reset()


def _layer(c=128, hw=8, dtype=torch.float16):
    torch.manual_seed(0)
    x = torch.randn(2, c, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(c, c // 32, 3, 3) * 0.3).to(dtype)
    return x, wt, torch.rand(c) + 0.5, torch.randn(c) * 0.1


def _launched(fn):
    """Names of the emulated kernels fn launched (none: the library path ran)."""
    return [r.kernel for r in emulator.profile(fn)]


def _choice(x, wt, training=False):
    return _dispatch.cuda_backend(x, wt, *[tuple(a) for a in ARGS[:3]], ARGS[3], training, ops=E)


@pytest.mark.parametrize("ours_ms,library_ms,expected", [(1.0, 2.0, "ours"), (2.0, 1.0, "cudnn")])
def test_the_faster_backend_runs_and_is_kept(ours_ms, library_ms, expected):
    x, wt, scale, shift = _layer()
    assert _choice(x, wt)[0] is None  # undecided before the first call
    E._backend_fake_times(ours_ms, library_ms)
    out = []
    kernels = _launched(lambda: out.append(E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True)))
    assert bool(kernels) == (expected == "ours")
    backend, why = _choice(x, wt)
    assert backend == expected and "1.000 ms" in why and "2.000 ms" in why
    ref = F.relu(F.conv2d(x.double(), wt.double(), None, 1, 1, 1, 32) * scale.double().view(1, -1, 1, 1)
                 + shift.double().view(1, -1, 1, 1))
    assert rel_err(out[0], ref) < 4e-3
    assert E._backend_timed() == 1
    E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True)  # the same problem: no second timing
    assert E._backend_timed() == 1
    E.conv_bn_relu_infer(x[:1], wt, scale, shift, *ARGS, True)  # another batch size: a new problem
    assert E._backend_timed() == 2


def test_forced_backend_and_deterministic_mode(monkeypatch):
    x, wt, scale, shift = _layer()
    E._backend_fake_times(1.0, 2.0)  # ours faster: forcing cuDNN must still take cuDNN
    monkeypatch.setenv("RESNEXT_KERNELS_CUDA_BACKEND", "cudnn")
    assert not _launched(lambda: E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True))
    assert _choice(x, wt)[0] == "cudnn"
    monkeypatch.setenv("RESNEXT_KERNELS_CUDA_BACKEND", "ours")
    E._backend_fake_times(2.0, 1.0)
    assert _launched(lambda: E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True))
    monkeypatch.setenv("RESNEXT_KERNELS_CUDA_BACKEND", "fastest")
    with pytest.raises(RuntimeError, match="must be ours, cudnn or auto"):
        E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True)
    monkeypatch.delenv("RESNEXT_KERNELS_CUDA_BACKEND")
    torch.use_deterministic_algorithms(True)
    try:
        assert _launched(lambda: E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True))  # cuDNN "faster": not timed
        assert E._backend_timed() == 0
        backend, why = _choice(x, wt)
        assert backend == "ours" and "deterministic" in why
    finally:
        torch.use_deterministic_algorithms(False)


def test_without_times_ours_runs_undecided():
    """The emulator without injected times (every other emulated test): the project's kernels, nothing cached."""
    x, wt, scale, shift = _layer()
    assert _launched(lambda: E.conv_bn_relu_infer(x, wt, scale, shift, *ARGS, True))
    assert E._backend_timed() == 0 and _choice(x, wt)[0] is None


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_library_path_training_forward_and_backward(dtype, affine):
    """The library path's training form returns what the fused op returns (out, conv_out, batch mean, biased
    variance) and its backward the four gradients, against float64 autograd of conv -> batch_norm -> relu."""
    x, wt, _, _ = _layer(c=64, hw=7, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    gamma = torch.rand(64, generator=gen) + 0.5 if affine else None
    beta = torch.randn(64, generator=gen) * 0.2 if affine else None
    E._backend_fake_times(2.0, 1.0)  # the library path for the forward and the backward
    out, conv_out, mean, var = E.conv_bn_relu_train(x, wt, gamma, beta, 1e-5, *ARGS, True)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    grads = E.conv_bn_relu_train_backward(grad, x, wt, conv_out, mean, var, gamma, beta, 1e-5, *ARGS, True,
                                          [True, True, affine])
    assert _choice(x, wt, training=True)[0] == "cudnn"
    d = torch.float64
    leaves = [t.detach().to(d).requires_grad_() for t in (x, wt)]
    bn = [t.detach().to(d).requires_grad_() if t is not None else None for t in (gamma, beta)]
    y = F.conv2d(leaves[0], leaves[1], None, 1, 1, 1, 32)
    ref = F.relu(F.batch_norm(y, None, None, bn[0], bn[1], True, 0.0, 1e-5))
    ref.backward(grad.to(d))
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert conv_out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(conv_out, y) <= tol and rel_err(out, ref) <= tol
    assert rel_err(mean, y.mean((0, 2, 3))) <= tol and rel_err(var, y.var((0, 2, 3), unbiased=False)) <= tol
    refs = [leaves[0].grad, leaves[1].grad] + ([bn[0].grad, bn[1].grad] if affine else [])
    for ours, r in zip(grads, refs):
        assert rel_err(ours, r) <= 10 * tol
