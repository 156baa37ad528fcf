// The oneDNN routes (onednn_1x1, onednn_large_block, onednn_intel): oneDNN's convolution through ATen, then the BN
// affine, residual and ReLU in one pass over its output.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "cpu/conv_kernels.h"
#include "cpu/isa.h"

namespace rk {
namespace cpu {
namespace {

// out = relu?(out * scale + shift + residual?) over rows [r0, r1) of C channels, in place (one pass over the output).
template <bool kRelu, bool kResidual, typename scalar_t>
RK_ALWAYS_INLINE void affine_rows_body(scalar_t* out, const float* __restrict scale, const float* __restrict shift,
                                       const scalar_t* residual, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* __restrict y = out + r * C;
    const scalar_t* __restrict res = kResidual ? residual + r * C : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float z = static_cast<float>(y[c]) * scale[c] + shift[c];
      if constexpr (kResidual) z += static_cast<float>(res[c]);
      y[c] = static_cast<scalar_t>(kRelu && z < 0.f ? 0.f : z);  // NaN passes, as torch.relu
    }
  }
}

// One entry point per dtype for AVX-512, AVX2 and baseline x86-64 (target_clones needs plain functions).
#define RK_DEFINE_AFFINE_ROWS(scalar_t)                                                                          \
  RK_CPU_ISA_CLONES void affine_rows(scalar_t* out, const float* scale, const float* shift,                     \
                                     const scalar_t* residual, int64_t C, bool relu, int64_t r0, int64_t r1) {  \
    if (relu && residual) affine_rows_body<true, true>(out, scale, shift, residual, C, r0, r1);                 \
    else if (relu) affine_rows_body<true, false>(out, scale, shift, residual, C, r0, r1);                       \
    else if (residual) affine_rows_body<false, true>(out, scale, shift, residual, C, r0, r1);                   \
    else affine_rows_body<false, false>(out, scale, shift, residual, C, r0, r1);                                \
  }
RK_DEFINE_AFFINE_ROWS(float)
RK_DEFINE_AFFINE_ROWS(c10::BFloat16)
#undef RK_DEFINE_AFFINE_ROWS

}  // namespace

// relu?(conv(x, weight) * scale + shift + residual?) through ATen (oneDNN), channels_last; scale and shift undefined:
// the bare convolution. The BN affine, residual and ReLU are one pass over the output after the convolution: folding
// the scale into a copy of the weight would be a pass over the weights on every call (at wide layers more bytes than
// the output), and oneDNN's ReLU a pass of its own.
at::Tensor conv_on_aten(const ConvGeom& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor* residual, bool relu) {
  at::Tensor out = at::convolution(x, weight.to(x.scalar_type()), std::nullopt, {g.stride_h, g.stride_w},
                                   {g.pad_h, g.pad_w}, {g.dil_h, g.dil_w}, /*transposed=*/false,
                                   /*output_padding=*/{0, 0}, g.groups)
                       .contiguous(at::MemoryFormat::ChannelsLast);
  if (!scale.defined() && !residual && !relu) return out;
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const at::Tensor sc = scale.defined() ? scale.to(at::kFloat).contiguous() : at::ones({g.C_out}, f32);
  const at::Tensor sh = shift.defined() ? shift.to(at::kFloat).contiguous() : at::zeros({g.C_out}, f32);
  const at::Tensor res = residual ? residual->contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const float* a = sc.data_ptr<float>();
  const float* b = sh.data_ptr<float>();
  const auto run = [&](auto* y, const auto* r) {
    at::parallel_for(0, g.N * g.OH * g.OW, std::max<int64_t>(1, 4096 / g.C_out), [&](int64_t r0, int64_t r1) {
      affine_rows(y, a, b, r, g.C_out, relu, r0, r1);
    });
  };
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16,
              "resnext_kernels (CPU kernel): the ATen route takes float32 or bfloat16, got ", out.scalar_type());
  if (out.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>(), res.defined() ? res.data_ptr<float>() : nullptr);
  } else {
    run(out.data_ptr<c10::BFloat16>(), res.defined() ? res.data_ptr<c10::BFloat16>() : nullptr);
  }
  return out;
}

}  // namespace cpu
}  // namespace rk
