"""The emulator's counters on the project's CUDA kernels (resnext_kernels.emulator.profile), the GPU model, the
profile CLI, and the SASS check of the inline-PTX wrappers. Exact counts of hand-made access patterns are in
tests/test_emulator.py; here the counts must agree with what the kernels' tensors imply."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from resnext_kernels import emulator
from resnext_kernels.emulator import __main__ as cli
from resnext_kernels.emulator import gpu_model

ROOT = os.path.join(os.path.dirname(__file__), "..")

pytestmark = pytest.mark.skipif(not emulator.counters_available(),
                                reason="this build has no emulator counters (the AddressSanitizer build)")


def _sectors(nbytes):
    return math.ceil(nbytes / 32) * 32


def _layer(n=2, c=64, hw=12, stride=1, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, c // 32, 3, 3) * 0.2).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_kernel_writes_its_output_once_and_reads_what_it_needs(dtype):
    x, w = _layer(dtype=dtype)
    ops = torch.ops.resnext_kernels_emu
    scale, shift = torch.ones(64), torch.zeros(64)
    [r] = emulator.profile(ops.conv_bn_relu_infer, x, w, scale, shift, [1, 1], [1, 1], [1, 1], 32, True)
    assert r.kernel.startswith("rk::cuda_kernels::conv_bn_relu_fwd_kernel<")
    e = x.element_size()
    y_bytes = x.numel() * e  # stride 1, padding 1: the output has the input's shape
    assert r.gst_bytes == r.gst_distinct_bytes == y_bytes  # every output element stored exactly once
    assert r.dram_write_bytes_min == _sectors(y_bytes)
    # reads: the input, the weight (an OHWI copy), scale and shift, each from its own allocation
    assert r.dram_read_bytes_min == _sectors(x.numel() * e) + _sectors(w.numel() * e) + 2 * _sectors(64 * 4)
    assert r.blocks == r.grid[0] * r.grid[1] and r.threads == 256 * r.blocks
    assert r.mma == 0 and r.cp_async_requests == 0  # today's kernel: CUDA cores, plain loads
    assert 0 < r.gst_efficiency < 0.5  # each warp store spreads over the output channels: the known weakness
    assert r.smem_ld_requests > 0 and r.smem_wavefronts >= r.smem_requests


def test_counting_changes_no_result():
    x, w = _layer()
    ops = torch.ops.resnext_kernels_emu
    args = (x, w, torch.ones(64), torch.zeros(64), [1, 1], [1, 1], [1, 1], 32, True)
    plain = ops.conv_bn_relu_infer(*args)
    counted = []
    emulator.profile(lambda: counted.append(ops.conv_bn_relu_infer(*args)))
    assert torch.equal(plain, counted[0])


@pytest.mark.parametrize("form", cli.FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_extrapolation_from_two_batches_is_exact(form, dtype):
    """Every kernel's work is affine in the batch where an image is a whole number of blocks (16x16 pixels: the
    statistics kernels' 256-row blocks; 8x8 images: two share a tensor-core CTA) and the batch a multiple of the
    images per CTA: counts at N=6 from N=2 and N=4 equal the counts at N=6."""
    hw, stride = (8, 1) if form == "inference" else (16, 1)
    runs = {n: cli._run_form(form, n, 64, hw, stride, dtype) for n in (2, 4, 6)}
    assert len(runs[2]) == len(runs[4]) == len(runs[6]) > 0
    for r1, r2, r3 in zip(runs[2], runs[4], runs[6]):
        assert cli.extrapolate(r1, r2, 6) == r3


def test_gpu_model_terms_and_occupancy():
    h100 = gpu_model.GPUS["h100"]
    # 256 threads at 93 registers: 3072 registers a warp, 24576 a block: 2 blocks an SM
    occ = gpu_model.occupancy(h100, threads=256, blocks=10_000, dynamic_smem=24832, registers=93)
    assert (occ.blocks_per_sm, occ.limited_by) == (2, "registers")
    # 100 KB of shared memory a block: 2 fit in 228 KB with the runtime's 1 KB each
    assert gpu_model.occupancy(h100, 128, 10_000, 100 * 1024).blocks_per_sm == 2
    assert gpu_model.occupancy(h100, 128, 66, 0).sm_fraction == pytest.approx(66 / 132)
    counts = {k: 0 for k in ("gld_sectors", "gst_sectors", "cp_async_sectors", "smem_ld_wavefronts",
                             "smem_st_wavefronts", "ldmatrix_wavefronts", "cp_async_smem_wavefronts",
                             "mma_m16n8k16_f16", "mma_m16n8k16_bf16", "mma_m16n8k8_tf32", "dram_write_bytes_min")}
    counts.update(block=(256, 1, 1), blocks=132 * 100, smem_bytes=0, dram_read_bytes_min=int(3.35e12 * 1e-5))
    p = gpu_model.predict(counts, "h100")
    assert p.bound == "dram" and p.us == pytest.approx(10.0)  # 33.5 MB at 3.35 TB/s
    counts["mma_m16n8k16_f16"] = 10**8  # 409.6 GFLOP at 989.4 TFLOPS: 100 blocks on every SM
    p = gpu_model.predict(counts, "h100")
    assert p.bound == "tensor" and p.us == pytest.approx(2 * 16 * 8 * 16 * 1e8 / 989.4e6, rel=1e-3)


def test_profile_cli_prints_and_writes_every_launch(tmp_path, capsys):
    out = tmp_path / "profile.json"
    rc = cli.main(["profile", "--models", "x50", "--shapes", "stage4", "--forms", "inference,training",
                   "--batch", "4", "--gpus", "h100,a100-80", "--json", str(out), "--format", "markdown"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {s["form"] for s in data["summaries"]} == {"inference", "training"}
    assert {r["gpu"] for r in data["rows"]} == {"h100", "a100-80"}
    fwd = [r for r in data["rows"] if r["form"] == "inference" and r["gpu"] == "h100"]
    assert len(fwd) == 1 and fwd[0]["predicted_us"] > 0 and fwd[0]["bound"] in fwd[0]["terms_us"]
    printed = capsys.readouterr().out
    assert "| x50.stage4 | float16 | inference | conv_tc_fwd_kernel<__half, 1, false, 1, 8, 4> |" in printed


def _nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def sass_tools():
    """(nvcc, scripts/check_sass.py as a module); skips the test without nvcc and cuobjdump, fails it in CI (which has
    both)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import check_sass
    from resnext_kernels.emulator import sass
    nvcc = _nvcc()
    if nvcc is None or sass.find_tool("cuobjdump") is None:
        if os.environ.get("CI"):
            pytest.fail("CI has nvcc and the pinned cuobjdump: the SASS check must run")
        pytest.skip("needs nvcc and cuobjdump")
    return nvcc, check_sass


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_wrappers_compile_to_their_instructions(arch):
    """nvcc builds tests/emu/ptx_kernels.cu: every wrapper must be its instruction in SASS, with no local memory."""
    nvcc, check_sass = sass_tools()
    src = os.path.join(ROOT, "tests", "emu", "ptx_kernels.cu")
    digest = hashlib.sha256()
    for path in (src, os.path.join(ROOT, "tests", "emu", "ptx_kernels.cuh"),
                 os.path.join(ROOT, "csrc", "cuda", "kernels", "ptx.cuh")):
        digest.update(open(path, "rb").read())
    cubin = os.path.join(tempfile.gettempdir(), f"rk_ptx_kernels_{arch}_{digest.hexdigest()[:16]}.cubin")
    if not os.path.exists(cubin):
        subprocess.run([nvcc, "-std=c++20", "-cubin", f"-arch={arch}", "-I", os.path.join(ROOT, "csrc"),
                        src, "-o", cubin + ".tmp"], check=True, capture_output=True, text=True)
        os.replace(cubin + ".tmp", cubin)
    rc = check_sass.main([cubin, "--quiet",
                          "--require", r"mma_kernel<0>=HMMA", "--require", r"mma_kernel<1>=HMMA",
                          "--require", r"mma_kernel<2>=HMMA",
                          "--require", r"mma_ldmatrix_kernel=HMMA,LDSM,LDGSTS",
                          "--require", r"ldmatrix_kernel=LDSM", "--require", r"cp_async_kernel=LDGSTS",
                          "--require", r"counter_patterns=LDG.128,STG.128",
                          "--forbid", r".=LDL,STL"])
    assert rc == 0
