// nvcc build of the ptx.cuh test kernels (tests/emu/ptx_kernels.cuh): tests/test_emulator.py compiles it for sm_80
// and sm_90 and checks with scripts/check_sass.py that each wrapper became its tensor-core or asynchronous-copy
// instruction.
#include "ptx_kernels.cuh"

namespace ptx_selftest {
template __global__ void mma_kernel<kMmaF16>(const void*, const void*, const float*, float*);
template __global__ void mma_kernel<kMmaBF16>(const void*, const void*, const float*, float*);
template __global__ void mma_kernel<kMmaTF32>(const void*, const void*, const float*, float*);
template __global__ void ldmatrix_kernel<4, false>(const uint16_t*, int, uint32_t*);
template __global__ void ldmatrix_kernel<2, true>(const uint16_t*, int, uint32_t*);
}  // namespace ptx_selftest
