"""g++ flags of the emulated kernels' translation units, shared by setup.py and tests/test_emulator.py.

-fsanitize=thread makes g++ call __tsan_readN / __tsan_writeN before every load and store of the optimized code;
no ThreadSanitizer runtime is linked: csrc/emu/emu_counters.cpp defines those hooks and counts the accesses. The
other flags keep each CUDA thread's accesses as the source writes them, as nvcc compiles them: no vectorization
(which would merge a thread's scalar accesses), no scalar replacement of aggregates (which would split a float4
load into four), no loops turned into memset/memcpy calls (which the hooks would not see).
"""

INSTRUMENT_FLAGS = [
    "-fsanitize=thread",
    "--param=tsan-instrument-func-entry-exit=0",
    "-fno-tree-vectorize",
    "-fno-tree-sra",
    "-fno-tree-loop-distribute-patterns",
]
