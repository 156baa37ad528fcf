// The CPU convolution's paths as conv_affine_nhwc_cpu (conv_bn_relu.cpp) runs them: one runner per path
// (conv_plan.h names them), each for the dtypes its path takes, and what several of them share.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/conv_plan.h"

namespace rk {
namespace cpu {

// One call: the plan and the call's tensors, validated. input, residual and out are channels_last (out allocated,
// not empty); the weight may have any strides (the packers read through them); scale and shift are defined, in the
// accumulation dtype; row_stats is [N * OH][3][C_out] of the accumulation type, or null.
struct ConvCall {
  const ConvPlan& plan;
  const at::Tensor& input;
  const at::Tensor& weight;
  const at::Tensor& scale;
  const at::Tensor& shift;
  const at::Tensor* residual;
  at::Tensor& out;
  bool relu;
  void* row_stats;
};

void run_winograd(const ConvCall& c);          // conv_winograd.cpp: winograd_f4x4, winograd_f2x2
void run_lanes(const ConvCall& c);             // conv_lanes.cpp
void run_broadcast_expand(const ConvCall& c);  // conv_broadcast_expand.cpp: broadcast, expand
void run_generic(const ConvCall& c);           // conv_generic.cpp

// The oneDNN routes (conv_onednn.cpp): relu?(conv(x, weight) * scale + shift + residual?) through ATen, channels_last;
// scale and shift undefined: the bare convolution.
at::Tensor conv_on_aten(const ConvGeom& g, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const at::Tensor& shift, const at::Tensor* residual, bool relu);

// fn(scalar_t()) for the vector paths' dtypes, float32 and bfloat16 (they accumulate in float).
template <class Fn>
void dispatch_vector_dtype(at::ScalarType dtype, const Fn& fn) {
  if (dtype == at::kFloat) return fn(float());
  TORCH_INTERNAL_ASSERT(dtype == at::kBFloat16, "resnext_kernels (CPU kernel): no vector path for ", dtype);
  fn(c10::BFloat16());
}

// Output rows per parallel task: enough that a task does at least ~64k multiply-adds.
inline int64_t row_grain(const ConvGeom& g) {
  const int64_t macs_per_row = g.OW * g.C_out * (g.C_in / g.groups) * g.KH * g.KW;
  return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(macs_per_row, 1));
}

// The first input channel of each output channel's group.
inline std::vector<int64_t> group_source_channels(const ConvGeom& g) {
  const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
  std::vector<int64_t> src_channel(g.C_out);
  for (int64_t co = 0; co < g.C_out; ++co) src_channel[co] = (co / cpg_out) * cpg_in;
  return src_channel;
}

// wp[co / B][kh][kw][ci][co % B] = weight[co][ci][kh][kw] * scale[co], in the accumulation type, for blocks of B
// output channels (B = C_out: one row (kh, kw, ci) holds all output channels). The broadcast, expand and generic
// paths' weights.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> pack_weight(const ConvGeom& g, const at::Tensor& weight, const at::Tensor& scale, int64_t B) {
  TORCH_INTERNAL_ASSERT(B > 0 && g.C_out % B == 0);
  // The weight is read through its strides: no copy of a channels_last module's weight on every call.
  const scalar_t* wsrc = weight.data_ptr<scalar_t>();
  const int64_t s_co = weight.stride(0), s_ci = weight.stride(1), s_kh = weight.stride(2), s_kw = weight.stride(3);
  const at::Tensor s = scale.contiguous();
  const acc_t* sc = s.data_ptr<acc_t>();
  const int64_t cpg_in = g.C_in / g.groups, khw = int64_t(g.KH) * g.KW, rows = khw * cpg_in;
  std::vector<acc_t> wp(rows * g.C_out);
  // Packed rows (block, k, ci) of B output channels: written contiguously, rows split across threads.
  at::parallel_for(0, rows * (g.C_out / B), std::max<int64_t>(1, 16384 / B), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t block = r / rows, k = (r % rows) / cpg_in, ci = r % cpg_in;
      const scalar_t* src = wsrc + ci * s_ci + (k / g.KW) * s_kh + (k % g.KW) * s_kw;
      acc_t* dst = wp.data() + r * B;
      for (int64_t j = 0; j < B; ++j) {
        const int64_t co = block * B + j;
        dst[j] = static_cast<acc_t>(src[co * s_co]) * sc[co];
      }
    }
  });
  return wp;
}

}  // namespace cpu
}  // namespace rk
