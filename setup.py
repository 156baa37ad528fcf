"""Build script of resnext_kernels's extensions (the package's metadata is in pyproject.toml).

Extensions:
  resnext_kernels._C    the operators: CPU kernels (C++), and CUDA kernels when nvcc is available.
  resnext_kernels._emu  the project's CUDA kernels compiled by g++ for the CUDA-on-CPU emulator
                        (tests run every CUDA kernel through it; see docs/emulator.md).

Environment switches:
  FORCE_CUDA=1                 a missing CUDA toolkit is an error instead of a CPU-only build
  RESNEXT_KERNELS_NO_CUDA=1    build the CPU kernels only, even when nvcc is present
  RESNEXT_KERNELS_NO_EMULATOR=1  skip the emulated build of the CUDA kernels
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;9.0", plus PTX of the newest)
  CUDA_HOME                    CUDA toolkit root (default: derived from nvcc, then /usr/local/cuda)
  NVCC_THREADS                 nvcc --threads (default 2: the archs compile in parallel)
  MAX_JOBS                     parallel compile jobs of ninja (torch's own switch)
  RESNEXT_KERNELS_DEBUG=1      -O0 -g builds
  RESNEXT_KERNELS_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer build of the C++ code (CPU kernels
                               and the emulated CUDA kernels; no nvcc). Used by scripts/sanitize.sh, which
                               builds into its own directory; it does not touch resnext_kernels/_build_info.py

build_ext writes resnext_kernels/_build_info.py (what was built, for `python -m resnext_kernels.info`) next to the
extensions it builds: into the source tree for in-place and editable builds, else into the build directory.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"[resnext_kernels] {msg}", file=sys.stderr, flush=True)


def _cuda_home_from_nvcc(nvcc):
    """The toolkit root as nvcc itself reports it (robust to wrapper scripts and symlinks)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if not m:
        return None
    return os.path.realpath(m.group(1).strip())


def find_cuda_home():
    """CUDA_HOME/CUDA_PATH if set, else the root nvcc reports, else /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _cuda_home_from_nvcc(nvcc)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def pip_cuda_include_dirs():
    """Headers shipped by the `nvidia-*` pip packages (cublas_v2.h, cusparse.h, cuda_fp16.h, ...)."""
    try:
        import nvidia  # noqa: F401  (namespace package installed with CUDA builds of torch)
    except ImportError:
        return []
    dirs = []
    for base in getattr(sys.modules["nvidia"], "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
CUDA_HOME = None if _env_flag("RESNEXT_KERNELS_NO_CUDA") else find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "csrc", "emu"))
from emu_flags import INSTRUMENT_FLAGS  # noqa: E402


def cuda_build_decision():
    """(build_cuda, reason)."""
    if _env_flag("RESNEXT_KERNELS_NO_CUDA"):
        return False, "RESNEXT_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no /usr/local/cuda)"
    return True, f"nvcc found in {CUDA_HOME}; torch built with CUDA {torch.version.cuda}"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def headers():
    """Every header the sources include: an extension is rebuilt when one of them changes."""
    return sources("csrc/**/*.h") + sources("csrc/**/*.cuh")


def cuda_header_dirs(cuda_home=None):
    """Where the toolkit's headers (cuda_fp16.h & co.) live: of cuda_home, by default the CUDA_HOME being built with."""
    cuda_home = cuda_home or CUDA_HOME
    dirs = []
    if cuda_home:
        dirs += [d for d in (os.path.join(cuda_home, "include"),
                             os.path.join(cuda_home, "targets", "x86_64-linux", "include")) if os.path.isdir(d)]
    return dirs


def emulator_header_dirs():
    """Headers for the g++-compiled emulator: cuda_fp16.h, cuda_bf16.h and the crt/ headers they include. The
    toolkit's when there is one (also with RESNEXT_KERNELS_NO_CUDA=1, which skips only the nvcc build), else the pip
    packages' when they hold the whole set (some ship cuda_fp16.h without crt/host_defines.h), else none."""
    def complete(dirs):
        return all(any(os.path.isfile(os.path.join(d, h)) for d in dirs)
                   for h in ("cuda_fp16.h", "cuda_bf16.h", os.path.join("crt", "host_defines.h")))
    for dirs in (cuda_header_dirs(CUDA_HOME or find_cuda_home()), pip_cuda_include_dirs()):
        if dirs and complete(dirs):
            return dirs
    return []


def extra_cuda_include_dirs():
    """pip-installed headers that the toolkit lacks but torch's headers include (cusparse.h, cublas_v2.h)."""
    have = set()
    for d in cuda_header_dirs():
        have |= set(os.listdir(d))
    extra = []
    for d in pip_cuda_include_dirs():
        if any(h in os.listdir(d) and h not in have for h in ("cusparse.h", "cublas_v2.h", "cublasLt.h")):
            extra.append(d)
    return extra


def build_extensions():
    debug = _env_flag("RESNEXT_KERNELS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    link = ["-fopenmp"]
    if SANITIZE:
        # -fno-sanitize-recover: every UBSan report aborts, so a report cannot pass unnoticed.
        sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        opt = ["-O1", "-g", "-fno-omit-frame-pointer"] + sanitizers
        link = link + sanitizers
    # -fopenmp: at::parallel_for is inlined into our code and is serial without it.
    cxx_flags = opt + ["-std=c++20", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    build_cuda, reason = cuda_build_decision()
    if SANITIZE:
        build_cuda, reason = False, "sanitizer build (RESNEXT_KERNELS_SANITIZE=1): C++ code only"
    elif not build_cuda and _env_flag("FORCE_CUDA"):
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    extensions = []
    c_sources = sources("csrc/ops.cpp") + sources("csrc/cpu/*.cpp")
    if build_cuda:
        _say(f"building CUDA + CPU kernels ({reason}); TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        nvcc_flags = opt + [
            "-std=c++20",
            "--threads", os.environ.get("NVCC_THREADS", "2"),
            "-Xptxas", "-v",  # resource usage of every kernel in the build log (spill check: scripts/check_ptxas.py)
            "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
        extensions.append(CUDAExtension(
            "resnext_kernels._C",
            c_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            depends=headers(),
            include_dirs=include_dirs + extra_cuda_include_dirs(),
            define_macros=[("RK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link,
        ))
    else:
        _say(f"building CPU kernels only: {reason}. Set FORCE_CUDA=1 to make this an error.")
        extensions.append(CppExtension("resnext_kernels._C", c_sources, include_dirs=include_dirs, depends=headers(),
                                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link))

    if _env_flag("RESNEXT_KERNELS_NO_EMULATOR"):
        _say("skipping the emulated CUDA build (RESNEXT_KERNELS_NO_EMULATOR=1)")
    else:
        emu_includes = emulator_header_dirs()
        if not emu_includes:
            _say("skipping the emulated CUDA build: no complete set of CUDA headers (cuda_fp16.h, cuda_bf16.h, "
                 "crt/host_defines.h) found")
        else:
            emu = CppExtension(
                "resnext_kernels._emu",
                sources("csrc/emu/*.cpp"),
                depends=headers(),
                include_dirs=include_dirs + emu_includes,
                define_macros=[("RK_EMULATOR", "1")],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link,
            )
            # The kernels (and their host launchers) get the counters' memory hooks; the emulator's runtime must
            # not (csrc/emu/emu_flags.py). ThreadSanitizer's instrumentation and AddressSanitizer's exclude each
            # other: the sanitizer build has no counters.
            if not SANITIZE:
                emu.rk_instrumented_sources = sources("csrc/emu/emu_module.cpp")
            extensions.append(emu)
    return extensions


def build_info_source(extensions):
    """resnext_kernels/_build_info.py for these extensions, printed by `python -m resnext_kernels.info`."""
    build_cuda = any(any(s.endswith(".cu") for s in e.sources) for e in extensions)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if build_cuda else ""
    nvcc_version = ""
    if build_cuda:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True)
        m = re.search(r"release ([0-9.]+)", out.stdout)
        nvcc_version = m.group(1) if m else "unknown"
    return ("# Generated by setup.py's build_ext; do not edit.\n"
            f"WITH_CUDA = {build_cuda!r}\n"
            f"CUDA_ARCH_LIST = {archs!r}\n"
            f"NVCC_VERSION = {nvcc_version!r}\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"SANITIZED = {SANITIZE!r}\n")


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension (ninja), plus:
    * an extension's `rk_instrumented_sources` are compiled with INSTRUMENT_FLAGS added (the emulated kernels:
      csrc/emu/emu_flags.py), the rest of its sources as usual, and all of them linked together;
    * then _build_info.py beside the built extensions: a build step, so that importing setup.py or
      `python setup.py --version` writes nothing."""

    def run(self):
        super().run()
        package_dir = os.path.join(ROOT if self.inplace else self.build_lib, "resnext_kernels")
        os.makedirs(package_dir, exist_ok=True)
        path = os.path.join(package_dir, "_build_info.py")
        with open(path, "w") as f:
            f.write(build_info_source(self.extensions))
        _say(f"wrote {os.path.relpath(path, ROOT)}")

    def build_extension(self, ext):
        special = getattr(ext, "rk_instrumented_sources", [])
        if special:
            ext.sources = [s for s in ext.sources if s not in special]
            args = ext.extra_compile_args
            if isinstance(args, dict):
                flags = {"cxx": list(args["cxx"]) + INSTRUMENT_FLAGS}
            else:
                flags = list(args) + INSTRUMENT_FLAGS
            objects = self.compiler.compile(special, output_dir=self.build_temp, macros=ext.define_macros,
                                            include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=flags,
                                            depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            ext.depends = list(ext.depends or []) + special  # a change to them rebuilds the extension
            ext.rk_instrumented_sources = []
        super().build_extension(ext)


SANITIZE = _env_flag("RESNEXT_KERNELS_SANITIZE")

setup(
    packages=find_packages(include=["resnext_kernels", "resnext_kernels.*"]),
    ext_modules=build_extensions(),
    cmdclass={"build_ext": BuildExt},
)
