// The CUDA path of a fused convolution: whether the project's forward kernel covers it (its launch plan,
// kernels/conv_bn_relu_fwd_plan.h), and where the training backward takes the convolution's gradients from. Plain C++:
// the host launchers (nvcc, and g++ for the emulator) and the CPU build's planner op (csrc/cpu/plan_ops.cpp) share it.
#pragma once

#include "cuda/kernels/conv_bn_relu_fwd_plan.h"
#include "cuda/kernels/conv_tc_plan.h"

namespace rk {

// Profiler scopes of the CUDA launchers, real and emulated; explain() names the same.
constexpr const char* kCudaDirectScope = "resnext_kernels::cuda_direct";        // conv_bn_relu_fwd_kernel
constexpr const char* kCudaTcScope = "resnext_kernels::cuda_tc";                // conv_tc_fwd_kernel (tensor cores)
constexpr const char* kCudaTcDgradScope = "resnext_kernels::dgrad_cuda_tc";     // conv_tc_fwd_kernel on grad_y
constexpr const char* kCudaBnStatsScope = "resnext_kernels::cuda_bn_stats";     // batch statistics + normalize
constexpr const char* kCudaBnBackwardScope = "resnext_kernels::cuda_bn_backward";  // BN + ReLU backward
constexpr const char* kCudaWgradScope = "resnext_kernels::wgrad_cuda";          // kernels/conv_wgrad.cuh
constexpr const char* kAtenDgradScope = "resnext_kernels::dgrad_aten";          // cuDNN through ATen
constexpr const char* kAtenWgradScope = "resnext_kernels::wgrad_aten";

// Whether the training backward takes the weight gradient from the deterministic kernels of kernels/conv_wgrad.cuh
// (1x1 and 3x3 kernels) rather than cuDNN: under torch.use_deterministic_algorithms(True) only, since they have not
// been timed against cuDNN on a GPU. The data gradient comes from the tensor-core kernel where
// cuda_kernels::conv_tc_data_grad_plan covers it, else from cuDNN.
inline bool cuda_weight_grad_kernel(const ConvGeom& g, bool deterministic) {
  const int64_t taps = int64_t(g.KH) * g.KW;
  return deterministic && (taps == 9 || taps == 1);
}

}  // namespace rk
