// nvcc build of the tensor-core weight-gradient kernels (csrc/cuda/kernels/conv_wgrad_tc.cuh) in every variant the
// host launches: tests/test_cuda_tensor_core_wgrad.py compiles it for sm_80 and sm_90 and checks ptxas's report (no
// spills) and the SASS (HMMA, LDGSTS, LDSM; no local memory) without a GPU.
#include "cuda/kernels/conv_wgrad_tc.cuh"

namespace rk {
namespace cuda_kernels {
#define RK_WGRAD_TC(T, TAPS, WIDE) \
  template __global__ void conv_wgrad_tc_kernel<T, TAPS, WIDE>(const T*, const T*, ConvGeom, WgradTcPlan, float*, T*);
RK_WGRAD_TC(__half, 9, false)
RK_WGRAD_TC(__half, 1, false)
RK_WGRAD_TC(__half, 9, true)
RK_WGRAD_TC(__half, 1, true)
RK_WGRAD_TC(__nv_bfloat16, 9, false)
RK_WGRAD_TC(__nv_bfloat16, 1, false)
RK_WGRAD_TC(__nv_bfloat16, 9, true)
RK_WGRAD_TC(__nv_bfloat16, 1, true)
#undef RK_WGRAD_TC
template __global__ void conv_wgrad_tc_finalize_kernel<__half>(const float*, int64_t, int64_t, __half*);
template __global__ void conv_wgrad_tc_finalize_kernel<__nv_bfloat16>(const float*, int64_t, int64_t, __nv_bfloat16*);
}  // namespace cuda_kernels
}  // namespace rk
