// Host side of the tensor-core weight gradient (kernels/conv_wgrad_tc.cuh), shared by the real CUDA build and the
// emulated build.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cuda/conv_tc_host.h"
#include "cuda/kernels/conv_wgrad_tc.cuh"

namespace rk {

// The tensor-core weight-gradient plan for this problem, or the reason there is none (`width`: see
// conv_wgrad_tc_plan).
inline const char* conv_wgrad_tc_unsupported_reason(const ConvGeom& g, at::ScalarType dtype,
                                                    cuda_kernels::WgradTcPlan* plan, int width = 0) {
  return cuda_kernels::conv_wgrad_tc_plan(g, dtype == at::kHalf || dtype == at::kBFloat16, plan, width);
}

// The convolution's weight gradient [C_out][cpg][KH][KW] (contiguous, x's dtype) from x and grad_y (channels_last,
// float16/bfloat16, as planned).
inline at::Tensor conv_wgrad_tc(const char* op, const ConvGeom& g, const cuda_kernels::WgradTcPlan& plan,
                                const at::Tensor& input, const at::Tensor& grad_y, cudaStream_t stream) {
  using namespace cuda_kernels;
  at::Tensor grad_weight = at::empty({g.C_out, plan.cpg, g.KH, g.KW}, input.options());
  if (plan.subtiles == 0 || g.OH * g.OW == 0) return grad_weight.zero_();
  // cp.async copies 16 bytes: both tensors' data 16-byte aligned (a view at an odd offset is copied).
  auto aligned = [](const at::Tensor& t) {
    const at::Tensor c = t.contiguous(at::MemoryFormat::ChannelsLast);
    return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 ? c.clone(at::MemoryFormat::ChannelsLast) : c;
  };
  const at::Tensor x = aligned(input), gy = aligned(grad_y);
  const int64_t numel = grad_weight.numel();
  at::Tensor partials;
  if (plan.chunks > 1) partials = at::empty({plan.chunks * numel}, input.options().dtype(at::kFloat));
  auto dispatch_half = [&](const auto& f) {
    if (input.scalar_type() == at::kHalf) {
      f(__half());
    } else {
      f(__nv_bfloat16());
    }
  };
  dispatch_half([&](auto t) {
    using T = decltype(t);
    const bool wide = plan.bw == kWtWide;
    auto kernel = plan.taps == 9 ? (wide ? conv_wgrad_tc_kernel<T, 9, true> : conv_wgrad_tc_kernel<T, 9, false>)
                                 : (wide ? conv_wgrad_tc_kernel<T, 1, true> : conv_wgrad_tc_kernel<T, 1, false>);
    if (plan.smem_bytes > 48 * 1024) tc_detail::check(set_max_dynamic_smem(kernel, plan.smem_bytes), op);
    float* pp = partials.defined() ? partials.mutable_data_ptr<float>() : nullptr;
    T* wp = reinterpret_cast<T*>(grad_weight.mutable_data_ptr());
    tc_detail::check(launch_kernel(kernel, dim3(unsigned(plan.blocks), unsigned(plan.chunks)), dim3(kWtThreads),
                                   plan.smem_bytes, stream, reinterpret_cast<const T*>(x.const_data_ptr()),
                                   reinterpret_cast<const T*>(gy.const_data_ptr()), g, plan, pp,
                                   pp ? nullptr : wp),
                     op);
    if (pp) {
      const int64_t threads = numel / 4;
      tc_detail::check(launch_kernel(conv_wgrad_tc_finalize_kernel<T>, dim3(unsigned((threads + 255) / 256)),
                                     dim3(256), 0, stream, static_cast<const float*>(pp), numel, plan.chunks, wp),
                       op);
    }
  });
  return grad_weight;
}

}  // namespace rk
