// Lanes path of the CPU conv kernel: grouped convolutions whose groups have c = C_in / groups = C_out / groups
// channels, c of 2, 4 or 8 (dividing the vector width L: ResNeXt-50's 4 and 8 channels per group at stages 1-2),
// kernel width 3.
//
// The expand path (conv_expand.h) puts output channels in the lanes, so each input pixel must first be
// expanded into c permuted copies, and its microkernel streams that L2-sized copy at one load per
// multiply-add. Here the lanes of a vector are L consecutive *input* channels (L / c whole groups): a tap's
// input is one contiguous load straight from the NHWC tensor, and accumulator acc[p][j] holds, in lane
// (group, ci), the running sum over taps of x[ci] * w[group * c + j][ci] for output pixel p. After the last
// tap a transpose-add tree (2 (c - 1) two-source shuffles and c - 1 adds) turns the c accumulators of a
// pixel into one vector of the same L channels as outputs, in channel order, which gets the other vector paths'
// epilogue (shift, residual, ReLU, row statistics).
//
// Weights are packed per vector of channels as wl[cb][kh][kw][j][lane] (BN scale folded in), so one
// microkernel reads a contiguous 9 c L floats. Input pointers per (kh, ow, kw) are tabulated once per output
// row and shared by all channel blocks; out-of-image columns point at a row of zeros, out-of-image rows are
// skipped, so the microkernel has no bounds branches.
//
// Included by conv_lanes.cpp only (always_inline, compiled once per ISA entry point there).
#pragma once

#include "cpu/conv_problem.h"

namespace rk {
namespace cpu {

// One level of the transpose-add tree: within each block of 2B lanes, the first B lanes get x's pairs
// (l, l + B) summed and the last B lanes get y's.
template <class V, int B>
RK_ALWAYS_INLINE typename V::vec pair_sum(typename V::vec x, typename V::vec y) {
  constexpr int L = V::kLanes;
  typename V::ivec lo, hi;
  for (int l = 0; l < L; ++l) {
    const int pos = l % (2 * B), base = l - pos;
    lo[l] = pos < B ? base + pos : L + base + pos - B;
    hi[l] = pos < B ? base + pos + B : L + base + pos;
  }
  return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// out[group * C + j] = sum over the group's C lanes of a[j]: log2(C) levels of pair_sum.
template <class V, int C, int B = 1>
RK_ALWAYS_INLINE typename V::vec transpose_add(const typename V::vec* a) {
  if constexpr (C == 1) {
    return a[0];
  } else {
    typename V::vec half[C / 2];
    for (int m = 0; m < C / 2; ++m) half[m] = pair_sum<V, B>(a[2 * m], a[2 * m + 1]);
    return transpose_add<V, C / 2, 2 * B>(half);
  }
}

// Pixels per microkernel for 2/4/8 channels per group: the TP * C accumulators, the C weight vectors of a tap (kept
// in registers and shared by the TP pixels) and an input vector must fit the register file without spills; at 8
// channels one pixel (weights as memory operands) measured as fast as two.
template <class V, int C>
constexpr int lane_pixels_per_block() {
  if constexpr (C == 8) return 1;
  if constexpr (V::kLanes == 16) return C == 4 ? 5 : 4;
  return C == 4 ? 2 : 4;
}

// TP output pixels of one row x the L channels from c0: all taps, then the epilogue. src[kh * tbl_stride +
// p * 3 + kw] points at the input pixel of (p, kh, kw) (channel 0) or at zeros.
template <class V, int C, int TP, typename scalar_t>
RK_ALWAYS_INLINE void lane_microkernel(const ConvProblem<scalar_t>& P, const bool* row_ok,
                                       const scalar_t* const* src, int64_t tbl_stride, int64_t c0, const float* w,
                                       scalar_t* out) {
  using vec = typename V::vec;
  constexpr int L = V::kLanes, KW = kLaneKernelWidth;
  const ConvGeom& g = *P.g;
  vec acc[TP][C];
  for (int p = 0; p < TP; ++p) {
    for (int j = 0; j < C; ++j) acc[p][j] = vec{};
  }
  for (int32_t kh = 0; kh < g.KH; ++kh) {
    if (!row_ok[kh]) continue;
    const scalar_t* const* s = src + kh * tbl_stride;
    const float* wk = w + int64_t(kh) * KW * C * L;
    for (int kw = 0; kw < KW; ++kw) {
      vec wv[C];
      for (int j = 0; j < C; ++j) wv[j] = vload<V>(wk + (kw * C + j) * L);
      if constexpr (TP > 1) {
        // Keep them in registers: GCC would otherwise fold each use into a memory operand, reloading them TP times.
        for (int j = 0; j < C; ++j) asm("" : "+v"(wv[j]));
      }
#pragma GCC unroll 8
      for (int p = 0; p < TP; ++p) {
        const vec x = vload<V>(s[p * KW + kw] + c0);
        for (int j = 0; j < C; ++j) acc[p][j] += x * wv[j];
      }
    }
  }
  const vec shift = vload<V>(P.shift + c0);
  for (int p = 0; p < TP; ++p) {
    // A copy, so that acc's address is never taken: with acc[p] passed to transpose_add, GCC keeps all TP * C
    // accumulators in memory and stores each one back after every multiply-add of the tap loop.
    vec a[C];
    for (int j = 0; j < C; ++j) a[j] = acc[p][j];
    vec r = transpose_add<V, C>(a) + shift;
    if (P.residual) r += vload<V>(P.residual + (out - P.out) + p * g.C_out);
    if (P.relu) r = r < vec{} ? vec{} : r;  // NaN passes, as torch.relu
    if (P.stream) {
      vstream<V>(out + p * g.C_out, r);
    } else {
      vstore<V>(out + p * g.C_out, r);
    }
  }
}

// The microkernel on np (<= TP) pixels, as a block of exactly that width.
template <class V, int C, int TP, typename scalar_t>
RK_ALWAYS_INLINE void lane_microkernel_tail(int np, const ConvProblem<scalar_t>& P, const bool* row_ok,
                                            const scalar_t* const* src, int64_t tbl_stride, int64_t c0,
                                            const float* w, scalar_t* out) {
  if constexpr (TP > 1) {
    if (np == TP) return lane_microkernel<V, C, TP>(P, row_ok, src, tbl_stride, c0, w, out);
    lane_microkernel_tail<V, C, TP - 1>(np, P, row_ok, src, tbl_stride, c0, w, out);
  } else {
    lane_microkernel<V, C, 1>(P, row_ok, src, tbl_stride, c0, w, out);
  }
}

// Computes output rows [row_begin, row_end) (row = n * OH + oh). P.wp is the lane-packed weight; tbl is the
// thread's pointer table of KH * OW * 3 entries.
template <class V, int C, typename scalar_t>
RK_ALWAYS_INLINE void lane_rows(const ConvProblem<scalar_t>& P, const scalar_t** tbl, int64_t row_begin,
                                int64_t row_end) {
  constexpr int L = V::kLanes, KW = kLaneKernelWidth;
  constexpr int TP = lane_pixels_per_block<V, C>();
  const ConvGeom& g = *P.g;
  const int64_t C_in = g.C_in, C_out = g.C_out, tbl_stride = g.OW * KW;
  bool row_ok[kMaxVectorKernel];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.OH, oh = row % g.OH;
    const int64_t ih0 = oh * g.stride_h - g.pad_h;
    for (int32_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
      row_ok[kh] = ih >= 0 && ih < g.H;
      if (!row_ok[kh]) continue;
      const scalar_t* in_row = P.in + (n * g.H + ih) * g.W * C_in;
      const scalar_t** t = tbl + kh * tbl_stride;
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        for (int kw = 0; kw < KW; ++kw) {
          const int64_t iw = ow * g.stride_w - g.pad_w + int64_t(kw) * g.dil_w;
          t[ow * KW + kw] = iw >= 0 && iw < g.W ? in_row + iw * C_in : P.zero_input;
        }
      }
    }
    scalar_t* out_row = P.out + row * g.OW * C_out;
    // Input rows the next output row of the image reads and this one does not (usually one, coming from DRAM: its
    // first touch would stall the microkernel), prefetched. Each channel block prefetches its lines of those rows
    // spread over its pixel blocks, a few pixels each: issued all at once, they can stall on full fill buffers.
    int64_t next_rows[kMaxVectorKernel];
    int n_next = 0;
    for (int32_t kh = 0; kh < g.KH && oh + 1 < g.OH; ++kh) {
      const int64_t ih = ih0 + g.stride_h + int64_t(kh) * g.dil_h;
      if (ih > ih0 + int64_t(g.KH - 1) * g.dil_h && ih < g.H) next_rows[n_next++] = ih;
    }
    for (int64_t c0 = 0; c0 < C_out; c0 += L) {
      const float* w = P.wp + c0 * g.KH * KW * C;
      for (int64_t t0 = 0; t0 < g.OW; t0 += TP) {
        const int np = int(std::min<int64_t>(TP, g.OW - t0));
        // This pixel block's share of the next rows' input pixels, this channel block's line of each.
        const int64_t iw0 = t0 * g.W / g.OW, iw1 = t0 + np == g.OW ? g.W : (t0 + np) * g.W / g.OW;
        for (int r = 0; r < n_next; ++r) {
          const scalar_t* next_row = P.in + (n * g.H + next_rows[r]) * g.W * C_in + c0;
          for (int64_t iw = iw0; iw < iw1; ++iw) __builtin_prefetch(next_row + iw * C_in);
        }
        scalar_t* out = out_row + t0 * C_out + c0;
        lane_microkernel_tail<V, C, TP>(np, P, row_ok, tbl + t0 * KW, tbl_stride, c0, w, out);
      }
      // The row's statistics for these channels in one pass over its pixels, still in L1 (per pixel block, the
      // pass's fixed costs had made the training form's conv 30% slower than the inference form at stage 1).
      if (P.row_stats) accumulate_row_stats_at<V, 1>(P, out_row + c0, row, 0, c0, int(g.OW));
    }
  }
  if (P.stream) stream_fence();
}

template <class V, typename scalar_t>
RK_ALWAYS_INLINE void lane_rows_dispatch(const ConvProblem<scalar_t>& P, const scalar_t** tbl, int c,
                                         int64_t row_begin, int64_t row_end) {
  switch (c) {
    case 2: return lane_rows<V, 2>(P, tbl, row_begin, row_end);
    case 4: return lane_rows<V, 4>(P, tbl, row_begin, row_end);
    case 8: return lane_rows<V, 8>(P, tbl, row_begin, row_end);
    default: break;
  }
}

}  // namespace cpu
}  // namespace rk
