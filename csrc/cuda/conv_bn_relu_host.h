// Host side of conv_bn_relu_infer on CUDA, shared by the real CUDA build (conv_bn_relu.cu) and the emulated
// build (csrc/emu), so the launch configuration the emulator tests is the one a GPU runs. Lean includes only:
// nvcc compiles this.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "common/conv_checks.h"
#include "common/path_scope.h"
#include "cuda/conv_tc_host.h"
#include "cuda/cuda_plan.h"
#include "cuda/kernels/conv_bn_relu_fwd.cuh"

namespace rk {

// The reason the CUDA kernel does not cover these arguments, or nullptr.
inline const char* conv_bn_relu_cuda_unsupported_reason(const ConvGeom& g, at::ScalarType dtype) {
  cuda_kernels::FwdPlan plan;
  return cuda_kernels::conv_bn_relu_fwd_plan(g, dtype == at::kDouble ? sizeof(double) : sizeof(float), &plan);
}

template <typename T, typename Acc>
void launch_conv_bn_relu_fwd(const ConvGeom& g, const cuda_kernels::FwdPlan& plan, const at::Tensor& x,
                             const at::Tensor& w, const at::Tensor& scale, const at::Tensor& shift, at::Tensor& out,
                             bool relu, cudaStream_t stream) {
  auto kernel = cuda_kernels::conv_bn_relu_fwd_kernel<T, Acc>;
  const cudaError_t err = launch_kernel(
      kernel, dim3(unsigned(plan.grid_x), unsigned(plan.grid_y)), dim3(cuda_kernels::kThreads), plan.smem_bytes,
      stream, reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<const T*>(w.const_data_ptr()),
      scale.const_data_ptr<Acc>(), shift.const_data_ptr<Acc>(), reinterpret_cast<T*>(out.mutable_data_ptr()), g,
      plan, relu);
  TORCH_CHECK(err == cudaSuccess, "resnext_kernels::conv_bn_relu_infer: kernel launch failed: ",
              cudaGetErrorString(err));
}

// relu?(conv2d(input, weight) * scale + shift) as a channels_last tensor, for validated arguments.
inline at::Tensor conv_affine_nhwc_cuda(const char* op, const ConvGeom& g, const at::Tensor& input,
                                        const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
                                        bool relu, cudaStream_t stream) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": input dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  cuda_kernels::FwdPlan plan;
  const char* why = cuda_kernels::conv_bn_relu_fwd_plan(g, dtype == at::kDouble ? sizeof(double) : sizeof(float), &plan);
  TORCH_CHECK(why == nullptr, op, ": not covered: ", why ? why : "");
  cuda_kernels::TcPlan tc;
  if (conv_tc_unsupported_reason(g, dtype, &tc) == nullptr) {  // the tensor cores
    const PathScope scope(kCudaTcScope);
    return conv_tc_infer(op, g, tc, input.contiguous(at::MemoryFormat::ChannelsLast), weight, scale.contiguous(),
                         shift.contiguous(), relu, stream);
  }
  const PathScope scope(kCudaDirectScope);
  at::Tensor out = at::empty({g.N, g.C_out, g.OH, g.OW}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() > 0) {
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w = weight.permute({0, 2, 3, 1}).contiguous();  // OHWI
    const at::Tensor sc = scale.contiguous(), sh = shift.contiguous();
    switch (dtype) {
      case at::kFloat: launch_conv_bn_relu_fwd<float, float>(g, plan, x, w, sc, sh, out, relu, stream); break;
      case at::kDouble: launch_conv_bn_relu_fwd<double, double>(g, plan, x, w, sc, sh, out, relu, stream); break;
      case at::kHalf: launch_conv_bn_relu_fwd<__half, float>(g, plan, x, w, sc, sh, out, relu, stream); break;
      default: launch_conv_bn_relu_fwd<__nv_bfloat16, float>(g, plan, x, w, sc, sh, out, relu, stream); break;
    }
  }
  return out;
}

// Validates, plans and launches; `stream` is the current CUDA stream (null in the emulator).
inline at::Tensor conv_bn_relu_infer_cuda_host(const at::Tensor& input, const at::Tensor& weight,
                                               const at::Tensor& scale, const at::Tensor& shift,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, int64_t groups, bool relu,
                                               cudaStream_t stream) {
  constexpr const char* op = "resnext_kernels::conv_bn_relu_infer (CUDA kernel)";
  const ConvGeom g = check_conv_bn_relu_args(op, input, weight, scale, shift, stride, padding, dilation, groups);
  return conv_affine_nhwc_cuda(op, g, input, weight, scale, shift, relu, stream)
      .contiguous(conv_output_memory_format(input, weight));
}

}  // namespace rk
