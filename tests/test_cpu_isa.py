"""The AVX2 and portable builds of the CPU kernels, run on this machine by capping the ISA in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

import resnext_kernels as rk

HERE = os.path.dirname(__file__)


def _run_capped(isa, **extra_env):
    package_root = os.path.dirname(os.path.dirname(rk.__file__))  # the build this process tests, not another install
    env = dict(os.environ, RESNEXT_KERNELS_CPU_ISA=isa, OMP_NUM_THREADS="2", PYTHONPATH=package_root, **extra_env)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cpu_isa_cases.py")], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("isa,expected", [("avx2", ("avx2", "baseline")), ("baseline", ("baseline",))])
def test_capped_isa_kernels_match_float64_reference(isa, expected):
    if isa == "avx2" and rk.ops.cpu_config().supported_isa == "baseline":
        pytest.skip("this CPU has no AVX2: the cap would test the portable code twice")
    result = _run_capped(isa)
    assert result.pop("isa") in expected
    assert result.pop("aten_routes") is True
    kernels = result.pop("kernels")
    if isa == "baseline":
        assert set(kernels.values()) <= {"generic", "onednn_1x1"}, kernels
    _check_errors(result)


def _check_errors(result):
    assert len(result) == 2 * 10 + 3 * 4
    for name, err in result.items():
        bound = 1e-2 if "bfloat16" in name else 1e-5
        assert err <= bound, (name, err)


def test_own_kernels_without_aten_routes_match_float64_reference():
    """RESNEXT_KERNELS_CPU_ATEN_ROUTES=off keeps every convolution on the project's kernels, on the best ISA this CPU
    has: on an Intel AVX-512 CPU that is the only run of the AVX-512 broadcast kernel (the routes give its shapes to
    oneDNN)."""
    isa = rk.ops.cpu_config().supported_isa
    result = _run_capped(isa, RESNEXT_KERNELS_CPU_ATEN_ROUTES="off")
    assert result.pop("isa") == isa and result.pop("aten_routes") is False
    kernels = result.pop("kernels")
    assert not any(k.startswith("onednn") for k in kernels.values()), kernels
    _check_errors(result)


def test_unknown_aten_routes_value_is_a_clear_error():
    env = dict(os.environ, RESNEXT_KERNELS_CPU_ATEN_ROUTES="maybe")
    proc = subprocess.run([sys.executable, "-c", "import resnext_kernels"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "RESNEXT_KERNELS_CPU_ATEN_ROUTES must be on or off" in proc.stderr


def test_unknown_isa_cap_is_a_clear_error():
    env = dict(os.environ, RESNEXT_KERNELS_CPU_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", "import resnext_kernels"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "RESNEXT_KERNELS_CPU_ISA must be one of" in proc.stderr
