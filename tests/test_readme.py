"""The README stays true: its Python examples run, and its table of environment variables names every variable that
the code, the scripts and the tests read (and no variable nothing reads)."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_SUFFIXES = (".py", ".cpp", ".h", ".cuh", ".cu", ".sh")
# Variables the project reads but does not own: set by torchrun, by the sanitizer runtimes, or Python's own.
NOT_OURS = {"LOCAL_RANK", "ASAN_OPTIONS", "UBSAN_OPTIONS", "PYTHONPATH", "OMP_NUM_THREADS", "TMPDIR"}
READS = [
    re.compile(r"""(?:environ(?:\.get|\.setdefault)?\(?\[?|getenv\(|_env_flag\()\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"\$\{([A-Z][A-Z0-9_]+):-"),  # shell defaults
    re.compile(r"""["'](RESNEXT_KERNELS_[A-Z0-9_]+)["']"""),  # names kept in constants
    re.compile(r"\b(RESNEXT_KERNELS_[A-Z0-9_]+)="),  # shell assignments and exports
]
LOOPS = re.compile(r"""for \w+ in \(((?:\s*["'][A-Z][A-Z0-9_]+["'],?)+)\):\s*\n\s*if os\.environ""")  # names read in turn


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _tracked_code():
    files = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    return [f for f in files if f.endswith(CODE_SUFFIXES) or f == ".ci/run"]


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    assert len(blocks) >= 2
    scope = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), scope)  # noqa: S102 - the README's own examples
    assert scope["y"].shape == (8, 128, 56, 56)
    assert scope["report"].converted


def test_every_environment_variable_is_documented():
    section = _readme().split("### Environment variables", 1)[1].split("\n## ", 1)[0]
    documented = {name for line in section.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([A-Z][A-Z0-9_]+)", line.split("|")[1])}
    read = set()
    for path in _tracked_code():
        if not os.path.exists(os.path.join(ROOT, path)):
            continue
        with open(os.path.join(ROOT, path), errors="replace") as f:
            text = f.read()
        for pattern in READS:
            read |= set(pattern.findall(text))
        for names in LOOPS.findall(text):
            read |= set(re.findall(r"[A-Z][A-Z0-9_]+", names))
    read -= NOT_OURS
    assert read - documented == set(), "read but not in the README's table"
    assert documented - read == set(), "in the README's table but read nowhere"
