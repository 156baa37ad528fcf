"""Runs the CPU kernels' main paths against float64 references and prints the errors as JSON.

tests/test_cpu_isa.py runs it in a subprocess under RESNEXT_KERNELS_CPU_ISA=avx2 and =baseline, since the ISA is
picked once per process: that is how the AVX2 and portable builds of the kernels get tested on an AVX-512 machine.
On AVX-512 it also runs under RESNEXT_KERNELS_CPU_ATEN_ROUTES=off: on Intel CPUs the broadcast-path shapes otherwise
go to oneDNN, and the AVX-512 broadcast kernel would go untested there.
"""

import json
import sys

import torch
from reference import reference_conv_affine_relu, rel_err

import resnext_kernels as rk
from resnext_kernels import ops

# (name, C_in, C_out, groups, kernel, stride, padding, dilation, H, W)
CONV_CASES = [
    ("lanes-2", 32, 32, 16, 3, 1, 1, 1, 7, 9),
    ("lanes-4", 64, 64, 16, 3, 2, 1, 1, 9, 11),
    ("lanes-8", 64, 64, 8, 3, 1, 2, 2, 8, 13),
    ("expand-depthwise", 32, 32, 32, 3, 1, 1, 1, 6, 7),
    ("expand-3", 24, 24, 8, 3, 1, 1, 1, 6, 7),
    ("broadcast-16", 64, 64, 4, 3, 1, 2, 2, 6, 7),  # dilation 2: not Winograd
    ("winograd-8", 64, 64, 8, 3, 1, 1, 1, 9, 11),
    ("winograd-32", 96, 96, 3, 3, 1, 0, 1, 6, 7),
    ("broadcast-dense", 16, 32, 1, 3, 2, 1, 1, 7, 6),
    ("pointwise", 32, 64, 1, 1, 1, 0, 1, 5, 6),
]


def conv_errors():
    errors = {}
    for name, cin, cout, groups, k, stride, padding, dilation, h, w in CONV_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, cin, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
            wt = (torch.randn(cout, cin // groups, k, k) / (cin // groups * k * k) ** 0.5).to(dtype)
            scale, shift = torch.rand(cout) + 0.5, torch.randn(cout)
            args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
            out = torch.ops.resnext_kernels.conv_bn_relu_infer(x, wt, scale, shift, *args, True)
            ref = reference_conv_affine_relu(x, wt, scale, shift, *args)
            errors[f"{name}/{str(dtype)[6:]}"] = rel_err(out, ref)
    return errors


def kernels():
    """rk.explain's kernel for each conv case, float32 inference."""
    out = {}
    for name, cin, cout, groups, k, stride, padding, dilation, h, w in CONV_CASES:
        x = torch.randn(2, cin, h, w).contiguous(memory_format=torch.channels_last)
        out[name] = rk.explain(x, torch.randn(cout, cin // groups, k, k), stride=stride, padding=padding,
                               dilation=dilation, groups=groups).kernel
    return out


def training_errors():
    """Training forward (statistics from the conv epilogue) and backward (the weight-gradient kernel) of a
    ResNeXt-width layer against torch.nn in float64."""
    errors = {}
    torch.use_deterministic_algorithms(True)  # every weight gradient through the project's kernel
    for groups, stride in ((16, 1), (8, 1), (1, 1), (2, 2)):  # lanes, Winograd F(4x4), dense Winograd, broadcast
        m = rk.nn.FusedGroupedConvBNReLU(64, 64, stride=stride, groups=groups).train()
        ref = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, stride, 1, groups=groups, bias=False),
                                  torch.nn.BatchNorm2d(64), torch.nn.ReLU()).double().train()
        ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
        x = torch.randn(2, 64, 9, 10).contiguous(memory_format=torch.channels_last)
        y, y_ref = m(x), ref(x.double())
        g = torch.randn_like(y_ref)
        (gw,) = torch.autograd.grad(y, m.conv.weight, g.float())
        (gw_ref,) = torch.autograd.grad(y_ref, ref[0].weight, g)
        errors[f"train-forward/{groups}/s{stride}"] = rel_err(y, y_ref)
        errors[f"train-weight-grad/{groups}/s{stride}"] = rel_err(gw, gw_ref)
        errors[f"train-running-var/{groups}/s{stride}"] = rel_err(m.bn.running_var, ref[1].running_var)
    return errors


if __name__ == "__main__":
    torch.manual_seed(0)
    result = {"isa": ops.cpu_config().isa, "aten_routes": ops.cpu_config().aten_routes, "kernels": kernels(),
              **conv_errors(), **training_errors()}
    json.dump(result, sys.stdout)
