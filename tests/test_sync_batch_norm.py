"""Synchronized BatchNorm through torch.distributed (gloo, CPU): 2 spawned processes against one process.

One spawn (module-scoped fixture) runs every distributed case; the workers torch.save their results and the
tests below compare them with single-process references.
"""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import rel_err
from torch import nn

import resnext_kernels as rk

WORLD = 2
BATCH, IMAGE, CLASSES = 8, 16, 5
STEPS, LR = 2, 0.1
# float64 cases of the conv -> sync BN (-> ReLU) op: (rows of rank 0, rows of rank 1), affine, relu, momentum
F64_CASES = {"unequal": ((3, 2), True, True, 0.1), "empty_rank": ((4, 0), True, True, 0.1),
             "no_affine_no_relu_cumulative": ((2, 3), False, False, None)}
F64_CONV = dict(cin=4, cout=6, k=3, stride=1, padding=1, dilation=1, groups=2)


def _small_resnext() -> nn.Module:
    torch.manual_seed(0)
    return rk.models.CifarResNeXt(cardinality=4, base_width=32, depth=11, num_classes=CLASSES, stem_channels=8,
                                  stage_planes=(4, 8))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 3, IMAGE, IMAGE, generator=g)
    y = torch.randint(0, CLASSES, (STEPS, BATCH), generator=g)
    return x, y


def _train(model, x, y, rank=None):
    """STEPS SGD steps on the (local) batches; returns losses, the gradients after step 1, the final state."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses, grads = [], None
    for step in range(STEPS):
        xs, ys = (x[step], y[step]) if rank is None else (x[step].chunk(WORLD)[rank], y[step].chunk(WORLD)[rank])
        opt.zero_grad()
        loss = F.cross_entropy(model(xs), ys)  # a mean over the local batch: DDP averages the gradients
        loss.backward()
        losses.append(loss.detach().clone())
        if step == 0:
            inner = model.module if hasattr(model, "module") else model
            grads = {name: p.grad.clone() for name, p in inner.named_parameters()}
        opt.step()
    inner = model.module if hasattr(model, "module") else model
    return losses, grads, {k: v.clone() for k, v in inner.state_dict().items()}


def _f64_inputs(split):
    c = F64_CONV
    g = torch.Generator().manual_seed(2)
    d = torch.float64
    n = sum(split)
    x = torch.randn(n, c["cin"], 5, 6, generator=g, dtype=d)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"], generator=g, dtype=d)
    gamma = torch.rand(c["cout"], generator=g, dtype=d) + 0.5
    beta = torch.randn(c["cout"], generator=g, dtype=d) * 0.3
    grad = torch.randn(n, c["cout"], 5, 6, generator=g, dtype=d)
    return x, w, gamma, beta, grad


def _f64_fused_module(w, gamma, beta, affine, relu, momentum):
    c = F64_CONV
    m = rk.nn.FusedGroupedConvBNReLU(c["cin"], c["cout"], c["k"], c["stride"], c["padding"], c["dilation"],
                                     c["groups"], relu=relu, momentum=momentum, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        m.conv.weight.copy_(w)
        if affine:
            m.bn.weight.copy_(gamma)
            m.bn.bias.copy_(beta)
    return m


def _f64_case(rank, split, affine, relu, momentum):
    """The synced op on this rank's rows: output, input/weight/gamma/beta gradients and running stats."""
    x, w, gamma, beta, grad = _f64_inputs(split)
    lo = sum(split[:rank])
    rows = slice(lo, lo + split[rank])
    m = rk.nn.convert_sync_batchnorm(_f64_fused_module(w, gamma, beta, affine, relu, momentum))
    decision = m.explain(x[rows])
    xr = x[rows].clone().requires_grad_()
    out = m(xr)
    out.backward(grad[rows])
    result = {"out": out.detach(), "grad_input": xr.grad, "grad_weight": m.conv.weight.grad,
              "running_mean": m.bn.running_mean, "running_var": m.bn.running_var,
              "num_batches_tracked": m.bn.num_batches_tracked, "reason": decision.reason}
    if affine:
        result.update(grad_gamma=m.bn.weight.grad, grad_beta=m.bn.bias.grad)
    return result


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"f64": {name: _f64_case(rank, *case) for name, case in F64_CASES.items()}}
        # The standard recipe; on CPU, DDP refuses modules that already hold nn.SyncBatchNorm, so wrap first and
        # convert the wrapped model (the layers of ddp.module are replaced in place, sharing parameters/buffers).
        model = nn.parallel.DistributedDataParallel(_small_resnext())
        rk.nn.convert_sync_batchnorm(model, dist.group.WORLD)
        n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        x, y = _data()
        losses, grads, state = _train(model, x, y, rank)
        mean_losses = []
        for loss in losses:  # the mean of the ranks' mean losses is the global mean loss
            dist.all_reduce(loss)
            mean_losses.append(loss / WORLD)
        results["ddp"] = {"losses": mean_losses, "grads": grads, "state": state, "n_sync": n_sync}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sync_bn"))
    mp.start_processes(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def _f64_reference(split, affine, relu, momentum):
    """float64 PyTorch over the concatenated batch (conv -> batch_norm(training) -> relu), with one copy of the
    conv weight and of gamma/beta per rank so that their gradients are each rank's share."""
    c = F64_CONV
    x, w, gamma, beta, grad = _f64_inputs(split)
    x = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for _ in split]
    gammas = [gamma.clone().requires_grad_() for _ in split]
    betas = [beta.clone().requires_grad_() for _ in split]
    xs = x.split(list(split))
    y = torch.cat([F.conv2d(xr, wr, None, c["stride"], c["padding"], c["dilation"], c["groups"])
                   for xr, wr in zip(xs, ws)])
    rm, rv = torch.zeros(c["cout"], dtype=torch.float64), torch.ones(c["cout"], dtype=torch.float64)
    yn = F.batch_norm(y, rm, rv, None, None, True, 1.0 if momentum is None else momentum, 1e-5)
    if affine:
        yn = torch.cat([yr * g.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
                        for yr, g, b in zip(yn.split(list(split)), gammas, betas)])
    out = F.relu(yn) if relu else yn
    out.backward(grad)
    refs = []
    lo = 0
    for r, n in enumerate(split):
        rows = slice(lo, lo + n)
        lo += n
        zeros = torch.zeros_like
        ref = {"out": out.detach()[rows], "grad_input": x.grad[rows],
               "grad_weight": ws[r].grad if ws[r].grad is not None else zeros(w),
               "running_mean": rm, "running_var": rv}
        if affine:
            ref.update(grad_gamma=gammas[r].grad if gammas[r].grad is not None else zeros(gamma),
                       grad_beta=betas[r].grad if betas[r].grad is not None else zeros(beta))
        refs.append(ref)
    return refs


@pytest.mark.parametrize("case", list(F64_CASES))
def test_float64_matches_pytorch_reference_per_rank(dist_results, case):
    refs = _f64_reference(*F64_CASES[case])
    for rank in range(WORLD):
        ours = dist_results[rank]["f64"][case]
        assert ours.keys() - {"reason", "num_batches_tracked"} == refs[rank].keys()
        assert "synchronized BatchNorm over 2 ranks" in ours["reason"]
        assert ours["num_batches_tracked"].item() == 1
        for key, ref in refs[rank].items():
            assert ours[key].shape == ref.shape, (rank, key)
            assert ours[key].dtype == torch.float64, (rank, key)
            assert rel_err(ours[key], ref) <= 1e-10, (rank, key, rel_err(ours[key], ref))


def test_running_stats_bitwise_equal_across_ranks(dist_results):
    for case in F64_CASES:
        a, b = (dist_results[r]["f64"][case] for r in range(WORLD))
        assert torch.equal(a["running_mean"], b["running_mean"])
        assert torch.equal(a["running_var"], b["running_var"])
    for key, value in dist_results[0]["ddp"]["state"].items():
        assert torch.equal(value, dist_results[1]["ddp"]["state"][key]), key


def test_ddp_sync_bn_matches_single_process(dist_results):
    torch.manual_seed(0)
    single = _small_resnext()  # plain BatchNorm2d, no DDP, the whole batch
    x, y = _data()
    losses, grads, state = _train(single, x, y)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in single.modules())
    for rank in range(WORLD):
        ddp = dist_results[rank]["ddp"]
        assert ddp["n_sync"] == n_bn > 0
        for step, (a, b) in enumerate(zip(ddp["losses"], losses)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"loss of step {step + 1}")
        assert grads.keys() == ddp["grads"].keys()
        for name, g in grads.items():
            torch.testing.assert_close(ddp["grads"][name], g, rtol=1e-4, atol=1e-5,
                                       msg=f"rank {rank}: gradient of {name} after step 1")
        assert state.keys() == ddp["state"].keys()
        for key, value in state.items():
            torch.testing.assert_close(ddp["state"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=f"rank {rank}: {key} after step {STEPS}")
        for key, value in state.items():
            if key.endswith("num_batches_tracked"):
                assert ddp["state"][key].item() == value.item() == STEPS


def test_no_sync_without_process_group():
    """Not initialized: a converted module trains exactly as the BatchNorm2d one (and eval is unaffected)."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    plain = rk.nn.FusedGroupedConvBNReLU(4, 8, 3, groups=2)
    synced = rk.nn.convert_sync_batchnorm(rk.nn.FusedGroupedConvBNReLU(4, 8, 3, groups=2))
    synced.load_state_dict(plain.state_dict())
    assert isinstance(synced.bn, nn.SyncBatchNorm)
    x = torch.randn(3, 4, 6, 6)
    assert synced.explain(x) == plain.explain(x)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.state_dict(), plain.state_dict(), rtol=0, atol=0)
    synced.eval()
    plain.eval()
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
