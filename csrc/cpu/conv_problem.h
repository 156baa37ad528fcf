// What a thread of the vector paths (lanes, broadcast, expand, Winograd) needs to compute output rows, and the
// per-row statistics their epilogues accumulate for the training form's BatchNorm.
//
// Everything is always_inline so that each ISA entry point (compiled with its own target attribute) gets code for
// its own vector width.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/conv_geometry.h"
#include "cpu/conv_plan.h"
#include "cpu/simd.h"

namespace rk {
namespace cpu {

// Everything a thread needs to compute output rows, fixed for one call of the op.
template <typename scalar_t>
struct ConvProblem {
  const ConvGeom* g;
  int64_t tile_ow, span, n_tiles, row_slots;
  bool expand;
  const scalar_t* in;
  const float* wp;      // BN scale folded in: [C_out / B][KH][KW][cpg_in][B] for B = w_ci_stride (see block_weights)
  const float* shift;   // [C_out]
  const int64_t* src_channel;  // first input channel of output channel co's group
  scalar_t* out;
  const scalar_t* residual;  // added before the ReLU when not null; same layout as out
  bool relu;
  const float* zero_expanded;  // cpg_in * C_out zeros
  const scalar_t* zero_input;  // C_in zeros
  float* row_stats;            // when not null: per output row, [pivot | sum(y - pivot) | sum((y - pivot)^2)] x C_out
  // Floats between the weight rows of consecutive input channels: C_out (expand mode: a row holds every output
  // channel), or the broadcast path's block of NV vectors, whose weights are then contiguous (rows C_out floats apart
  // would put a block's KH * KW * cpg_in rows 4 KB apart at 1024 channels: all in one L1 set).
  int64_t w_ci_stride;
  // Lanes path, AVX-512, float32 inference form (no statistics, no residual), output of at least
  // kStreamOutputBytes at a 64-byte aligned address: each 16-float output vector, one whole cache line, is written
  // with a non-temporal store (no read-for-ownership of the line; see lane_rows).
  bool stream;
  // Winograd path: software prefetches of the next tile block's input and this block's output (WinogradPrefetch).
  bool prefetch;
};

// Per-row statistics of the stored output, for the training form's BatchNorm: the pivot is the row's first pixel
// (ow = 0, written by the row's first call for these channels), and the sums are of deviations from it, so a
// large common offset does not cancel (the rows are merged with Chan's formula in float64 by the caller).
// The statistics are those of the tensor that gets normalized: of the stored (dtype-rounded) values.
// For np pixels of output row `row` from column ow, channels co0.. (NV vectors): pixel(p, v) returns pixel p's
// vector v, as stored.
template <class V, int NV, typename scalar_t, class Pixel>
RK_ALWAYS_INLINE void accumulate_row_stats_of(const ConvProblem<scalar_t>& P, const Pixel& pixel, int64_t row,
                                              int64_t ow, int64_t co0, int np) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes;
  const int64_t C_out = P.g->C_out;
  float* st = P.row_stats + row * 3 * C_out + co0;
  for (int v = 0; v < NV; ++v) {
    const vec pivot = ow == 0 ? pixel(0, v) : vload<V>(st + v * L);
    vec s{}, q{};
    for (int p = 0; p < np; ++p) {
      const vec d = pixel(p, v) - pivot;
      s += d;
      q += d * d;
    }
    if (ow == 0) {
      vstore<V>(st + v * L, pivot);
      vstore<V>(st + C_out + v * L, s);
      vstore<V>(st + 2 * C_out + v * L, q);
    } else {
      vstore<V>(st + C_out + v * L, vload<V>(st + C_out + v * L) + s);
      vstore<V>(st + 2 * C_out + v * L, vload<V>(st + 2 * C_out + v * L) + q);
    }
  }
}

// The same, reading the pixels back from `out` (pixel p at out + p * C_out; the caller knows where it is).
template <class V, int NV, typename scalar_t>
RK_ALWAYS_INLINE void accumulate_row_stats_at(const ConvProblem<scalar_t>& P, const scalar_t* out, int64_t row,
                                              int64_t ow, int64_t co0, int np) {
  const int64_t C_out = P.g->C_out;
  const auto pixel = [&](int p, int v) { return vload<V>(out + p * C_out + v * V::kLanes); };
  accumulate_row_stats_of<V, NV>(P, pixel, row, ow, co0, np);
}

}  // namespace cpu
}  // namespace rk
