"""nvcc's ``-Xptxas -v`` report, as the build log keeps it: per (kernel symbol, architecture) its registers, static
shared memory, stack frame and spills. Torch-free: scripts/check_ptxas.py loads this file by path."""

from __future__ import annotations

import re

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"ptxas info\s*: Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def parse(text: str) -> dict[tuple[str, str], dict[str, int | None]]:
    """{(kernel symbol, arch): {"regs", "smem", "stack", "spill_stores", "spill_loads"}}"""
    kernels: dict[tuple[str, str], dict[str, int | None]] = {}
    current = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = (m.group(1), m.group(2))
            kernels[current] = {"regs": None, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if current is None:
            continue
        m = SPILL.search(line)
        if m:
            info = kernels[current]
            info["stack"], info["spill_stores"], info["spill_loads"] = map(int, m.groups())
            continue
        m = REGS.search(line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            s = SMEM.search(line)
            if s:
                kernels[current]["smem"] = int(s.group(1))
    return kernels


def read(path: str) -> dict[tuple[str, str], dict[str, int | None]]:
    with open(path, errors="replace") as f:
        return parse(f.read())
