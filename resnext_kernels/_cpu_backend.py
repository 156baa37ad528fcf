"""The run-time choice on CPU between the project's kernels and ATen's ``conv2d -> batch_norm -> relu`` (oneDNN's
convolution), per problem: the CPU counterpart of csrc/cuda/backend_choice.h.

oneDNN's speed depends on the vendor, the ISA (bfloat16 with AVX512_BF16 or AMX) and the layout (its NCHW kernels
against ours, which compute channels_last), so no static rule keeps a user from being slower than the library path on
every machine. The first call of each problem (form, shapes, strides, padding, dilation, groups, dtype, layout, ReLU,
whether autograd needs gradients, thread count) times both, warmed up and interleaved, and keeps the faster for the
process. In training both candidates are timed forward and backward, as a step runs them.

``RESNEXT_KERNELS_CPU_BACKEND=ours|aten`` forces one (read at every call). Under
``torch.use_deterministic_algorithms(True)`` the project's kernels run untimed (a timed choice could differ between
processes). Under torch.compile nothing is timed: a choice made before (eagerly) is kept, else ATen's sequence
runs, which Inductor then compiles (BatchNorm folded, weights packed, ReLU fused) as it would the user's own model.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._common import suggest_memory_format

BACKEND_ENV = "RESNEXT_KERNELS_CPU_BACKEND"
OURS, ATEN = "ours", "aten"
SCOPE = "resnext_kernels::aten"  # the profiler scope of a call the choice sent to ATen
# ATen's sequence is chosen only when this much faster: within it the timing is noise, and the sequence keeps two
# activation-sized tensors for backward (BatchNorm's input and output) where the fused op keeps one, a memory cost an
# isolated layer's timing does not see.
ATEN_MARGIN = 0.95


class Choice(NamedTuple):
    backend: str | None  # OURS, ATEN, or None: not timed yet
    ours_ms: float | None
    aten_ms: float | None
    reason: str


_lock = threading.Lock()
_choices: dict[tuple, Choice] = {}
_fake_ms: tuple[float, float] | None = None  # tests: (ours, aten) milliseconds instead of timing
_timed = 0
on_clear: list[Callable[[], None]] = []  # caches derived from the choices, emptied by clear()


def mode() -> str:
    """"auto" (the default), OURS or ATEN, from RESNEXT_KERNELS_CPU_BACKEND."""
    value = os.environ.get(BACKEND_ENV, "")
    if value in ("", "auto"):
        return "auto"
    if value in (OURS, ATEN):
        return value
    raise ValueError(f"{BACKEND_ENV} must be ours, aten or auto (or unset), got {value!r}")


def problem_key(training: bool, input: Tensor, weight: Tensor, stride, padding, dilation, groups: int, relu: bool,
                need_grad: bool) -> tuple:
    channels_last = suggest_memory_format(input) == torch.channels_last  # as the kernels take the layout
    return (training, tuple(input.shape), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation), groups,
            input.dtype, channels_last, relu, need_grad)


def time_candidates(candidates: dict[str, Callable[[], object]], min_run_s: float = 2e-3) -> dict[str, float]:
    """Seconds per call of each candidate: the fastest of 5 interleaved runs (3 for candidates over 20 ms), after two
    warm-up runs of each (weights packed, oneDNN primitives created, memory allocated: a first call of a fresh
    problem can take several times its steady time); interleaving gives a clock or load change to all. A run repeats
    a candidate faster than ``min_run_s`` (up to 16 times), so that one timer tick or interrupt does not decide."""
    reps, elapsed = {}, {}
    for _ in range(2):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            elapsed[name] = time.perf_counter() - start
    for name, t in elapsed.items():
        reps[name] = max(1, min(16, int(min_run_s / max(t, 1e-9))))
    rounds = 3 if max(elapsed.values()) > 0.02 else 5
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / reps[name])
    return best


def _forced() -> Choice | None:
    m = mode()
    if m != "auto":
        return Choice(m, None, None, f"forced by {BACKEND_ENV}")
    if torch.are_deterministic_algorithms_enabled():
        return Choice(OURS, None, None, "torch.use_deterministic_algorithms is on: the project's kernels, which are "
                                        "deterministic, without timing")
    return None


def lookup(key: tuple) -> Choice:
    """The choice for ``key`` without timing (explain()); backend None when the first call has not timed it yet."""
    forced = _forced()
    if forced is not None:
        return forced
    with _lock:
        found = _choices.get((*key, torch.get_num_threads()))
    return found or Choice(None, None, None, "not timed yet: the first call times the project's kernels against "
                                             "ATen's conv2d + batch_norm + relu")


@torch.compiler.assume_constant_result
def _compiled_backend(key: tuple) -> str:
    """Under torch.compile: the choice made eagerly before, else ATen's sequence, for Inductor to optimize as it
    would the user's own model (a trace cannot time; our ops would keep Inductor from folding and packing)."""
    return lookup(key).backend or ATEN


def choose(key: tuple, ours: Callable[[], object], aten: Callable[[], object]) -> str:
    """OURS or ATEN for the problem ``key``; the first call in auto mode times ``ours`` against ``aten`` (each runs the
    whole candidate: forward, and backward where a step needs it) and keeps the faster."""
    if torch.compiler.is_compiling():
        if any(isinstance(s, torch.SymInt) for s in key[1]):
            return OURS  # dynamic sizes: no one problem to look up
        return _compiled_backend(key)
    choice = lookup(key)
    if choice.backend is not None:
        return choice.backend
    global _timed
    if _fake_ms is not None:
        ours_ms, aten_ms = _fake_ms
    else:
        best = time_candidates({OURS: ours, ATEN: aten})
        ours_ms, aten_ms = best[OURS] * 1e3, best[ATEN] * 1e3
    backend = ATEN if aten_ms < ATEN_MARGIN * ours_ms else OURS
    reason = (f"timed on the first call: the project's kernels {ours_ms:.3f} ms, ATen's conv2d + batch_norm + relu "
              f"{aten_ms:.3f} ms (best of 3-5 runs): {'ATen' if backend == ATEN else 'ours'} runs (ATen only when "
              f"{100 - 100 * ATEN_MARGIN:.0f}% faster)")
    with _lock:
        _timed += 1
        return _choices.setdefault((*key, torch.get_num_threads()), Choice(backend, ours_ms, aten_ms, reason)).backend


def scope(name: str = SCOPE) -> contextlib.AbstractContextManager:
    """A profiler scope, opened only while a profiler records (opening one costs more than a small convolution's
    time otherwise)."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


def set_fake_times(ours_ms: float | None, aten_ms: float | None = None) -> None:
    """Tests: later timings give these times instead of running the candidates (None: time for real again)."""
    global _fake_ms
    _fake_ms = None if ours_ms is None else (float(ours_ms), float(aten_ms))


def clear() -> None:
    """Forgets every choice made (and the count of timings), and what layers remembered of them."""
    global _timed
    with _lock:
        _choices.clear()
        _timed = 0
    for forget in on_clear:
        forget()


def timed() -> int:
    """How many problems have been timed since the last clear()."""
    return _timed
