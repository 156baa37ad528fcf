import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Each kernel path is tested by the planner's rules: the CPU run-time choice against ATen, which depends on what this
# machine measures, is forced to the project's kernels except where a test turns it on (test_cpu_backend_choice.py).
# Subprocesses of the suite inherit it.
os.environ["RESNEXT_KERNELS_CPU_BACKEND"] = "ours"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    """Under scripts/sanitize.sh the suite must run against the sanitizer build, never silently against the
    regular one (which would make a clean sanitizer run meaningless). Under .ci/run the emulated CUDA build must
    be there: without it every CUDA kernel test would be skipped and the run would still look green."""
    if os.environ.get("RESNEXT_KERNELS_REQUIRE_EMULATOR", "0") == "1":
        from resnext_kernels import emulator
        if not emulator.available():
            raise pytest.UsageError("RESNEXT_KERNELS_REQUIRE_EMULATOR=1 but resnext_kernels._emu (the emulated CUDA "
                                    "kernels) was not built; see the build log (logs/build.log)")
    if os.environ.get("RESNEXT_KERNELS_EXPECT_SANITIZED", "0") != "1":
        return
    import resnext_kernels
    from resnext_kernels import _build_info
    if not getattr(_build_info, "SANITIZED", False):
        raise pytest.UsageError(f"RESNEXT_KERNELS_EXPECT_SANITIZED=1 but resnext_kernels was imported from "
                                f"{resnext_kernels.__file__}, which is not the sanitizer build")


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test: the training backward then always runs the project's
    weight-gradient kernels (CPU: any shape; emulated CUDA: 3x3 and 1x1), so every path of them can be tested."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def pytest_terminal_summary(terminalreporter):
    """Examples per CPU path of the property tests (tests/test_properties.py) and cells per path of the path matrix
    (tests/test_path_matrix.py), when they ran."""
    from reference import FUZZ_PATHS, PATH_MATRIX
    for config, cells in PATH_MATRIX.items():
        terminalreporter.write_line(f"path matrix cells per path ({config}): " +
                                    ", ".join(f"{path} {n}" for path, n in cells.items()))
    for form, counts in sorted(FUZZ_PATHS.items()):
        if counts:
            terminalreporter.write_line(f"fuzz examples per CPU path ({form}): " +
                                        ", ".join(f"{path} {n}" for path, n in sorted(counts.items())))
