"""The instruction mix of compiled CUDA kernels, from ``cuobjdump -sass`` (which disassembles without a GPU).
Torch-free: scripts/check_sass.py loads this file by path.

cuobjdump comes with the CUDA toolkit, or from the pip packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm
(requirements.txt pins them); find_tool() looks in both places.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import subprocess
import sys

# Instruction classes a reader of a kernel's SASS looks for first: tensor cores, asynchronous copies, the width of
# global and shared accesses, FP32 math, local memory (register spills or stack arrays), barriers, shuffles.
CLASSES = ("HMMA", "LDGSTS", "LDSM", "LDG.128", "LDG.64", "LDG.32", "STG.128", "STG.64", "STG.32", "LDS", "STS",
           "FFMA", "HFMA2", "DFMA", "LDL", "STL", "BAR", "SHFL")

_ARCH = re.compile(r"(?:code for|arch =)\s*(sm_\d+a?)")
_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def find_tool(name: str = "cuobjdump") -> str | None:
    """cuobjdump (or nvdisasm) from PATH, CUDA_HOME, /usr/local/cuda, or an installed nvidia-cuda-* wheel."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name),
                  os.path.join("/usr/local/cuda", "bin", name)]
    for base in sys.path:
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "*", "bin", name)))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def disassemble(path: str, arch: str | None = None) -> str:
    """`cuobjdump -sass` of a cubin, object or shared library (every embedded architecture, or just `arch`)."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found: install the CUDA toolkit or `pip install "
                                "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` (requirements.txt pins them)")
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(tool) + os.pathsep + env.get("PATH", "")  # it runs nvdisasm from there
    cmd = [tool, "-sass"] + (["-arch", arch] if arch else []) + [path]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout


def classify(opcode: str) -> list[str]:
    """The CLASSES an opcode (with its modifiers, e.g. LDG.E.128.CONSTANT) belongs to."""
    parts = opcode.split(".")
    head = parts[0]
    if head in ("LDG", "STG"):
        width = "128" if "128" in parts else "64" if "64" in parts else "32"
        return [f"{head}.{width}"]
    if head == "LDGSTS":
        return ["LDGSTS"]
    return [head] if head in CLASSES else []


def parse(text: str) -> dict[tuple[str, str], collections.Counter]:
    """{(kernel symbol, arch): Counter of CLASSES, plus "total" instructions}"""
    mixes: dict[tuple[str, str], collections.Counter] = {}
    arch, current = None, None
    for line in text.splitlines():
        m = _ARCH.search(line)
        if m:
            arch = m.group(1)
            continue
        m = _FUNCTION.search(line)
        if m:
            current = mixes.setdefault((m.group(1), arch or "?"), collections.Counter())
            continue
        if current is None:
            continue
        m = _INSTRUCTION.search(line)
        if m:
            current["total"] += 1
            for c in classify(m.group(1)):
                current[c] += 1
    return mixes


def demangle(names: list[str]) -> dict[str, str]:
    """Short names (no return type or parameters) by c++filt, where it is installed."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    return {n: _short(d) for n, d in zip(names, out)}


def _short(signature: str) -> str:
    depth, begin = 0, 0
    for i, ch in enumerate(signature):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == " " and depth == 0:
            begin = i + 1
        elif ch == "(" and depth == 0:
            return signature[begin:i]
    return signature[begin:]
