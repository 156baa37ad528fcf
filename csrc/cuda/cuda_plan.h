// The CUDA path of a fused convolution: whether the project's forward kernel covers it (its launch plan,
// kernels/conv_bn_relu_fwd_plan.h), and where the training backward takes the convolution's gradients from. Plain C++:
// the host launchers (nvcc, and g++ for the emulator) and the CPU build's planner op (csrc/cpu/plan_ops.cpp) share it.
#pragma once

#include "cuda/kernels/conv_bn_relu_fwd_plan.h"
#include "cuda/kernels/conv_tc_plan.h"
#include "cuda/kernels/conv_wgrad_tc_plan.h"

namespace rk {

// Profiler scopes of the CUDA launchers, real and emulated; explain() names the same.
constexpr const char* kCudaDirectScope = "resnext_kernels::cuda_direct";        // conv_bn_relu_fwd_kernel
constexpr const char* kCudaTcScope = "resnext_kernels::cuda_tc";                // conv_tc_fwd_kernel (tensor cores)
constexpr const char* kCudaTcDgradScope = "resnext_kernels::dgrad_cuda_tc";     // conv_tc_fwd_kernel on grad_y
constexpr const char* kCudaBnStatsScope = "resnext_kernels::cuda_bn_stats";     // batch statistics + normalize
constexpr const char* kCudaBnBackwardScope = "resnext_kernels::cuda_bn_backward";  // BN + ReLU backward
constexpr const char* kCudaWgradScope = "resnext_kernels::wgrad_cuda";          // kernels/conv_wgrad.cuh
constexpr const char* kCudaTcWgradScope = "resnext_kernels::wgrad_cuda_tc";     // kernels/conv_wgrad_tc.cuh
constexpr const char* kAtenDgradScope = "resnext_kernels::dgrad_aten";          // cuDNN through ATen
constexpr const char* kAtenWgradScope = "resnext_kernels::wgrad_aten";

enum class WeightGradSource { kTensorCores, kDeterministic, kAten };

// Where the training backward takes the convolution's weight gradient from: the tensor-core kernel
// (kernels/conv_wgrad_tc.cuh, deterministic) wherever cuda_kernels::conv_wgrad_tc_plan covers the problem (`plan`
// filled); else, under torch.use_deterministic_algorithms(True), the project's CUDA-core kernels of
// kernels/conv_wgrad.cuh (1x1 and 3x3), which are not the default because they have not been timed against cuDNN
// on a GPU; else cuDNN. The data gradient comes from the tensor-core kernel where
// cuda_kernels::conv_tc_data_grad_plan covers it, else from cuDNN.
inline WeightGradSource cuda_weight_grad_source(const ConvGeom& g, bool half, bool deterministic,
                                                cuda_kernels::WgradTcPlan* plan) {
  if (cuda_kernels::conv_wgrad_tc_plan(g, half, plan) == nullptr) return WeightGradSource::kTensorCores;
  const int64_t taps = int64_t(g.KH) * g.KW;
  return deterministic && (taps == 9 || taps == 1) ? WeightGradSource::kDeterministic : WeightGradSource::kAten;
}

}  // namespace rk
