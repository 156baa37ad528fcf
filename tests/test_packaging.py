"""Packaging: one version source, _build_info.py written by the build (not by running setup.py for metadata) and
matching what the build registered, and the files a release needs."""

import os
import re
import subprocess
import sys

import torch

import resnext_kernels
from resnext_kernels import _build_info, version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_one_version_source():
    pyproject = _read("pyproject.toml")
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "resnext_kernels.version.__version__" }' in pyproject
    assert not re.search(r"\bversion\s*=", _read("setup.py"))
    assert resnext_kernels.__version__ == version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version.__version__)
    assert f"## {version.__version__} - " in _read("CHANGELOG.md")


def test_setup_py_metadata_writes_no_build_info():
    path = os.path.join(os.path.dirname(resnext_kernels.__file__), "_build_info.py")
    before = (os.path.getmtime(path), _read(os.path.relpath(path, ROOT))) if os.path.exists(path) else None
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == version.__version__
    after = (os.path.getmtime(path), _read(os.path.relpath(path, ROOT))) if os.path.exists(path) else None
    assert after == before


def test_build_info_matches_the_build():
    """_build_info.WITH_CUDA says whether the extension registered CUDA kernels; the torch it names is the one
    running (the extension loads only there)."""
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("resnext_kernels::conv_bn_relu_infer", "CUDA")
    assert _build_info.WITH_CUDA == has_cuda_kernel
    assert _build_info.TORCH_VERSION == torch.__version__
    assert bool(_build_info.CUDA_ARCH_LIST) == _build_info.WITH_CUDA


def test_license_and_changelog():
    license_text = _read("LICENSE")
    assert license_text.startswith("BSD 3-Clause License") and "resnext_kernels contributors" in license_text
    assert 'license = "BSD-3-Clause"' in _read("pyproject.toml")
