// Expand path of the CPU conv kernel: groups too narrow for the lanes or broadcast paths (depthwise, 3 per group).
// The input columns of a tile are first expanded to e[ci][co] = x[group(co) * cpg_in + ci], so that the
// microkernel (conv_microkernel.h) runs over all C_out channels with no per-group bookkeeping.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/conv_microkernel.h"

namespace rk {
namespace cpu {

// Expands input row ih of image n for one column tile into a cache slot, unless the slot holds it already:
// e[j][ci][co] = x[n, ih, iw0 + j, src_channel[co] + ci]. When a vector's lanes cover whole groups and a
// group has no more inputs than outputs, the inputs a vector needs sit in one vector-sized chunk, and each
// ci is one in-register permute of it; otherwise elements are gathered one by one.
template <class V, typename scalar_t>
RK_ALWAYS_INLINE const float* expanded_row(const ConvProblem<scalar_t>& P, MicrokernelScratch& S, int64_t n,
                                           int64_t ih, int64_t tile, int64_t iw0) {
  using vec = typename V::vec;
  using ivec = typename V::ivec;
  constexpr int L = V::kLanes;
  const ConvGeom& g = *P.g;
  const int64_t C_in = g.C_in, C_out = g.C_out, cpg_in = C_in / g.groups, cpg_out = C_out / g.groups;
  const int64_t tap_stride = cpg_in * C_out;
  const int64_t slot = ih % P.row_slots;
  float* rowbuf = S.expanded + slot * P.span * tap_stride;
  const int64_t tag = (n * g.H + ih) * P.n_tiles + tile;
  if (S.slot_tag[slot] == tag) return rowbuf;
  S.slot_tag[slot] = tag;
  const bool permute = cpg_in <= cpg_out && L % cpg_out == 0;
  const int64_t chunk = (L / cpg_out) * cpg_in;  // inputs read by one vector of outputs (permute case)
  ivec lane_src;
  for (int l = 0; l < L; ++l) lane_src[l] = int32_t((l / cpg_out) * cpg_in);
  for (int64_t j = 0; j < P.span; ++j) {
    const int64_t iw = iw0 + j;
    if (iw < 0 || iw >= g.W) continue;  // never read: the microkernel points at zeros there
    const scalar_t* px = P.in + ((n * g.H + ih) * g.W + iw) * C_in;
    float* e = rowbuf + j * tap_stride;
    if (permute) {
      for (int64_t co0 = 0; co0 < C_out; co0 += L) {
        const scalar_t* src = px + P.src_channel[co0];
        vec x{};
        for (int64_t k = 0; k < chunk; ++k) x[k] = static_cast<float>(src[k]);
        for (int64_t ci = 0; ci < cpg_in; ++ci) {
          vstore<V>(e + ci * C_out + co0, __builtin_shuffle(x, lane_src + int32_t(ci)));
        }
      }
    } else {
      for (int64_t ci = 0; ci < cpg_in; ++ci) {
        for (int64_t co = 0; co < C_out; ++co) e[ci * C_out + co] = static_cast<float>(px[P.src_channel[co] + ci]);
      }
    }
  }
  return rowbuf;
}

// Expand mode: one column tile of output row `row` for the CB output channels from co0, pixel blocks of TP
// through the microkernel. rows[kh] are the tile's expanded input rows.
template <class V, int NV, typename scalar_t>
RK_ALWAYS_INLINE void expand_tile_channels(const ConvProblem<scalar_t>& P, MicrokernelScratch& S, int64_t row,
                                           int64_t tile, int64_t co0, const bool* row_ok, const float* const* rows) {
  constexpr int TP = pixels_per_block<V, NV>();
  const ConvGeom& g = *P.g;
  const int64_t C_out = g.C_out, tap_stride = (g.C_in / g.groups) * C_out;
  const int64_t taps = int64_t(g.KH) * g.KW;
  const int64_t ow0 = tile * P.tile_ow, nt = std::min(P.tile_ow, g.OW - ow0);
  const int64_t iw0 = ow0 * g.stride_w - g.pad_w;
  scalar_t* out_row = P.out + (row * g.OW + ow0) * C_out;
  for (int64_t t0 = 0; t0 < nt; t0 += TP) {
    const int np = int(std::min<int64_t>(TP, nt - t0));
    for (int32_t kh = 0; kh < g.KH; ++kh) {
      if (!row_ok[kh]) continue;
      for (int32_t kw = 0; kw < g.KW; ++kw) {
        const void** s = S.src + int64_t(kh) * g.KW + kw;
        for (int p = 0; p < np; ++p) {
          const int64_t j = (t0 + p) * g.stride_w + int64_t(kw) * g.dil_w;
          const int64_t iw = iw0 + j;
          s[p * taps] = (iw >= 0 && iw < g.W ? rows[kh] + j * tap_stride : P.zero_expanded) + co0;
        }
      }
    }
    microkernel_tail<V, NV, TP, true>(np, P, row_ok, S.src, 0, block_weights(P, co0), P.shift + co0,
                                      out_row + t0 * C_out + co0);
  }
  if (P.row_stats) accumulate_row_stats_at<V, NV>(P, out_row + co0, row, ow0, co0, int(nt));  // the tile at once
}

// Computes output rows [row_begin, row_end) (row = n * OH + oh) with blocks of NV vectors, row by row (the cached
// expanded rows serve every channel block).
template <class V, int NV, typename scalar_t>
RK_ALWAYS_INLINE void expand_rows(const ConvProblem<scalar_t>& P, MicrokernelScratch& S, int64_t row_begin,
                                  int64_t row_end) {
  constexpr int CB = NV * V::kLanes;
  const ConvGeom& g = *P.g;
  bool row_ok[kMaxVectorKernel];
  const float* rows[kMaxVectorKernel];
  for (int64_t row = row_begin; row < row_end; ++row) {
    taps_inside(g, row, row_ok);
    const int64_t n = row / g.OH, ih0 = (row % g.OH) * g.stride_h - g.pad_h;
    for (int64_t tile = 0; tile < P.n_tiles; ++tile) {
      const int64_t iw0 = tile * P.tile_ow * g.stride_w - g.pad_w;
      for (int32_t kh = 0; kh < g.KH; ++kh) {
        if (row_ok[kh]) rows[kh] = expanded_row<V>(P, S, n, ih0 + int64_t(kh) * g.dil_h, tile, iw0);
      }
      for (int64_t co0 = 0; co0 < g.C_out; co0 += CB) expand_tile_channels<V, NV>(P, S, row, tile, co0, row_ok, rows);
    }
  }
}

}  // namespace cpu
}  // namespace rk
