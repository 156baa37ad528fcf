// The register-blocked microkernel of the broadcast and expand paths (conv_broadcast.h, conv_expand.h; float32 and
// bfloat16 inputs, float accumulation).
//
// The unit of work is a microkernel call: TP consecutive output pixels of one row x CB = NV * lanes
// consecutive output channels. Its TP x NV accumulator vectors live in registers from the first tap to
// the store; per (tap, input channel) it loads NV weight vectors (shared by the TP pixels) and either
// broadcasts one input value per pixel (broadcast mode: the block lies inside one group) or loads NV
// vectors of expanded input per pixel (expand mode: lanes span several narrow groups). TP is the
// largest count whose accumulators fit the ISA's register budget, leaving room for weights and inputs.
//
// Sources of out-of-image taps point at a row of zeros, so the microkernel has no bounds branches; taps
// whose input row is outside the image are skipped as a whole.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/conv_problem.h"

namespace rk {
namespace cpu {

// Most pixels a microkernel computes at once (sizes the source-pointer scratch).
constexpr int kMaxPixelsPerBlock = 8;

template <class V, int NV>
constexpr int pixels_per_block() {
  return std::min(kMaxPixelsPerBlock, V::kAccRegs / NV);
}

// The packed weights of the block of output channels from co0 (a multiple of w_ci_stride, or inside its only block).
template <typename scalar_t>
RK_ALWAYS_INLINE const float* block_weights(const ConvProblem<scalar_t>& P, int64_t co0) {
  const ConvGeom& g = *P.g;
  const int64_t B = P.w_ci_stride, rows = int64_t(g.KH) * g.KW * (g.C_in / g.groups);
  return P.wp + (co0 / B) * B * rows + co0 % B;
}

// Per-thread scratch: the cache of expanded input rows (row_slots of span * cpg_in * C_out), their tags,
// and the microkernel's source pointers, src[p * KH * KW + tap] (expand mode: one block's; broadcast mode: a band's,
// see broadcast_source_table).
struct MicrokernelScratch {
  float* expanded;
  int64_t* slot_tag;
  const void** src;
  void* packed;  // broadcast mode with groups: one group's input channels of a band's input rows (see broadcast_rows)
};

// row_ok[kh]: whether tap row kh of output row `row` is inside the image (with merge, of this row or of the rows
// merged before).
RK_ALWAYS_INLINE void taps_inside(const ConvGeom& g, int64_t row, bool* row_ok, bool merge = false) {
  const int64_t ih0 = (row % g.OH) * g.stride_h - g.pad_h;
  for (int32_t kh = 0; kh < g.KH; ++kh) {
    const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
    row_ok[kh] = (merge && row_ok[kh]) || (ih >= 0 && ih < g.H);
  }
}

// src[p * KH * KW + tap] is pixel p's source for the tap; broadcast mode adds src_offset input channels to it.
template <class V, int NV, int TP, bool EXPAND, typename scalar_t>
RK_ALWAYS_INLINE void microkernel(const ConvProblem<scalar_t>& P, const bool* row_ok, const void* const* src,
                                  int64_t src_offset, const float* w, const float* shift, scalar_t* out) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  const int64_t C_out = g.C_out, cpg_in = g.C_in / g.groups, w_row = P.w_ci_stride, tap_stride = cpg_in * w_row;
  const int64_t taps = int64_t(g.KH) * g.KW;
  vec acc[TP][NV];
  for (int v = 0; v < NV; ++v) {
    const vec s = vload<V>(shift + v * L);
    for (int p = 0; p < TP; ++p) acc[p][v] = s;
  }
  for (int32_t kh = 0; kh < g.KH; ++kh) {
    if (!row_ok[kh]) continue;
    for (int32_t kw = 0; kw < g.KW; ++kw) {
      const int64_t tap = int64_t(kh) * g.KW + kw;
      const float* wt = w + tap * tap_stride;
      const void* s[TP];
      for (int p = 0; p < TP; ++p) s[p] = src[p * taps + tap];
      for (int64_t ci = 0; ci < cpg_in; ++ci) {
        vec wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = vload<V>(wt + ci * w_row + v * L);
#pragma GCC unroll 8
        for (int p = 0; p < TP; ++p) {
          if constexpr (EXPAND) {
            const float* e = static_cast<const float*>(s[p]) + ci * C_out;
            for (int v = 0; v < NV; ++v) acc[p][v] += vload<V>(e + v * L) * wv[v];
          } else {
            const float x = static_cast<float>(static_cast<const scalar_t*>(s[p])[src_offset + ci]);
            for (int v = 0; v < NV; ++v) acc[p][v] += x * wv[v];
          }
        }
      }
    }
  }
  for (int p = 0; p < TP; ++p) {
    for (int v = 0; v < NV; ++v) {
      vec r = acc[p][v];
      if (P.residual) r += vload<V>(P.residual + (out - P.out) + p * C_out + v * L);
      if (P.relu) r = r < vec{} ? vec{} : r;  // NaN passes, as torch.relu
      vstore<V>(out + p * C_out + v * L, r);
    }
  }
}

// Runs the microkernel on np (< TP) pixels: a block of exactly that width, so weights are still reused.
template <class V, int NV, int TP, bool EXPAND, typename scalar_t>
RK_ALWAYS_INLINE void microkernel_tail(int np, const ConvProblem<scalar_t>& P, const bool* row_ok,
                                       const void* const* src, int64_t src_offset, const float* w,
                                       const float* shift, scalar_t* out) {
  if constexpr (TP > 1) {
    if (np == TP) return microkernel<V, NV, TP, EXPAND>(P, row_ok, src, src_offset, w, shift, out);
    microkernel_tail<V, NV, TP - 1, EXPAND>(np, P, row_ok, src, src_offset, w, shift, out);
  } else {
    microkernel<V, NV, 1, EXPAND>(P, row_ok, src, src_offset, w, shift, out);
  }
}

}  // namespace cpu
}  // namespace rk
