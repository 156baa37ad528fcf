// Register-blocked path of the CPU fused conv kernel (float32 and bfloat16 inputs, float accumulation).
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
//
// This header is included by conv_bn_relu.cpp only; everything is always_inline so that each
// ISA entry point (compiled with its own target attribute) gets code for its own vector width.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/conv_geometry.h"
#include "cpu/conv_plan.h"
#include "cpu/simd.h"

namespace rk {
namespace cpu {

// Most pixels a microkernel computes at once (sizes the source-pointer scratch).
constexpr int kMaxPixelsPerBlock = 8;

template <class V, int NV>
constexpr int pixels_per_block() {
  return std::min(kMaxPixelsPerBlock, V::kAccRegs / NV);
}

// Everything a thread needs to compute output rows, fixed for one call of the op.
template <typename scalar_t>
struct BlockedProblem {
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
  // channel), or the broadcast path's block of NV vectors, whose weights are then contiguous. (With rows C_out floats
  // apart, a block's KH * KW * cpg_in rows were 4 KB apart at 1024 channels: all in one L1 set, and in 16 of L2's.)
  int64_t w_ci_stride;
  // Channel-lane path, AVX-512, float32 inference form (no statistics, no residual), output of at least
  // kStreamOutputBytes at a 64-byte aligned address: each 16-float output vector, one whole cache line, is written
  // with a non-temporal store (no read-for-ownership of the line; see lane_rows).
  bool stream;
  // Winograd path: software prefetches of the next tile block's input and this block's output (WinogradPrefetch).
  bool prefetch;
};

// The packed weights of the block of output channels from co0 (a multiple of w_ci_stride, or inside its only block).
template <typename scalar_t>
RK_ALWAYS_INLINE const float* block_weights(const BlockedProblem<scalar_t>& P, int64_t co0) {
  const ConvGeom& g = *P.g;
  const int64_t B = P.w_ci_stride, rows = int64_t(g.KH) * g.KW * (g.C_in / g.groups);
  return P.wp + (co0 / B) * B * rows + co0 % B;
}

// Per-row statistics of the stored output, for the training form's BatchNorm: the pivot is the row's first pixel
// (ow = 0, written by the row's first call for these channels), and the sums are of deviations from it, so a
// large common offset does not cancel (the rows are merged with Chan's formula in float64 by the caller).
// The statistics are those of the tensor that gets normalized: of the stored (dtype-rounded) values.
// For np pixels of output row `row` from column ow, channels co0.. (NV vectors): pixel(p, v) returns pixel p's
// vector v, as stored.
template <class V, int NV, typename scalar_t, class Pixel>
RK_ALWAYS_INLINE void accumulate_row_stats_of(const BlockedProblem<scalar_t>& P, const Pixel& pixel, int64_t row,
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
RK_ALWAYS_INLINE void accumulate_row_stats_at(const BlockedProblem<scalar_t>& P, const scalar_t* out, int64_t row,
                                              int64_t ow, int64_t co0, int np) {
  const int64_t C_out = P.g->C_out;
  const auto pixel = [&](int p, int v) { return vload<V>(out + p * C_out + v * V::kLanes); };
  accumulate_row_stats_of<V, NV>(P, pixel, row, ow, co0, np);
}

// Per-thread scratch: the cache of expanded input rows (row_slots of span * cpg_in * C_out), their tags,
// and the microkernel's source pointers, src[p * KH * KW + tap] (expand mode: one block's; broadcast mode: a band's,
// see broadcast_source_table).
struct BlockedScratch {
  float* expanded;
  int64_t* slot_tag;
  const void** src;
  void* packed;  // broadcast mode with groups: one group's input channels of a band's input rows (see blocked_rows)
};

// src[p * KH * KW + tap] is pixel p's source for the tap; broadcast mode adds src_offset input channels to it.
template <class V, int NV, int TP, bool EXPAND, typename scalar_t>
RK_ALWAYS_INLINE void microkernel(const BlockedProblem<scalar_t>& P, const bool* row_ok, const void* const* src,
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

// Expands input row ih of image n for one column tile into a cache slot, unless the slot holds it already:
// e[j][ci][co] = x[n, ih, iw0 + j, src_channel[co] + ci]. When a vector's lanes cover whole groups and a
// group has no more inputs than outputs, the inputs a vector needs sit in one vector-sized chunk, and each
// ci is one in-register permute of it; otherwise elements are gathered one by one.
template <class V, typename scalar_t>
RK_ALWAYS_INLINE const float* expanded_row(const BlockedProblem<scalar_t>& P, BlockedScratch& S, int64_t n,
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

// Runs the microkernel on np (< TP) pixels: a block of exactly that width, so weights are still reused.
template <class V, int NV, int TP, bool EXPAND, typename scalar_t>
RK_ALWAYS_INLINE void microkernel_tail(int np, const BlockedProblem<scalar_t>& P, const bool* row_ok,
                                       const void* const* src, int64_t src_offset, const float* w,
                                       const float* shift, scalar_t* out) {
  if constexpr (TP > 1) {
    if (np == TP) return microkernel<V, NV, TP, EXPAND>(P, row_ok, src, src_offset, w, shift, out);
    microkernel_tail<V, NV, TP - 1, EXPAND>(np, P, row_ok, src, src_offset, w, shift, out);
  } else {
    microkernel<V, NV, 1, EXPAND>(P, row_ok, src, src_offset, w, shift, out);
  }
}

// Expand mode: one column tile of output row `row` for the CB output channels from co0, pixel blocks of TP
// through the microkernel. rows[kh] are the tile's expanded input rows.
template <class V, int NV, typename scalar_t>
RK_ALWAYS_INLINE void expand_tile_channels(const BlockedProblem<scalar_t>& P, BlockedScratch& S, int64_t row,
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

// Broadcast mode: the source pointers (group 0's first input channel, or `zeros` outside the image) of every pixel
// and tap of output rows [b0, b1), tbl[((row - b0) * OW + ow) * KH * KW + tap]; each channel block then adds its
// group's offset. pixel(n, ih, iw) gives the source of an input pixel inside the image.
template <typename scalar_t, class Pixel>
RK_ALWAYS_INLINE void broadcast_source_table(const BlockedProblem<scalar_t>& P, const void** tbl, int64_t b0,
                                             int64_t b1, const scalar_t* zeros, const Pixel& pixel) {
  const ConvGeom& g = *P.g;
  const int64_t taps = int64_t(g.KH) * g.KW;
  for (int64_t row = b0; row < b1; ++row) {
    const int64_t n = row / g.OH, ih0 = (row % g.OH) * g.stride_h - g.pad_h;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const void** t = tbl + ((row - b0) * g.OW + ow) * taps;
      for (int32_t kh = 0; kh < g.KH; ++kh) {
        const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
        for (int32_t kw = 0; kw < g.KW; ++kw) {
          const int64_t iw = ow * g.stride_w - g.pad_w + int64_t(kw) * g.dil_w;
          const bool inside = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
          t[int64_t(kh) * g.KW + kw] = static_cast<const void*>(inside ? pixel(n, ih, iw) : zeros);
        }
      }
    }
  }
}

// The input rows a band of output rows [b0, b1) reads, per image: rows [first_ih, first_ih + count) of image n0 + i
// sit from row base in the band's packed copy (blocked_rows). At most kMaxBandImages images per band.
constexpr int64_t kMaxBandImages = 64;
struct BandInputRows {
  int64_t n0, n1;
  int64_t first_ih[kMaxBandImages], base[kMaxBandImages + 1];
};

inline BandInputRows band_input_rows(const ConvGeom& g, int64_t b0, int64_t b1) {
  BandInputRows r{};
  r.n0 = b0 / g.OH, r.n1 = (b1 - 1) / g.OH;
  r.base[0] = 0;
  for (int64_t n = r.n0; n <= r.n1; ++n) {
    const int64_t oh_a = n == r.n0 ? b0 % g.OH : 0, oh_b = n == r.n1 ? (b1 - 1) % g.OH : g.OH - 1;
    const int64_t ih_a = std::max<int64_t>(0, oh_a * g.stride_h - g.pad_h);
    const int64_t ih_b = std::min<int64_t>(g.H - 1, oh_b * g.stride_h - g.pad_h + int64_t(g.KH - 1) * g.dil_h);
    r.first_ih[n - r.n0] = ih_a;
    r.base[n - r.n0 + 1] = r.base[n - r.n0] + std::max<int64_t>(0, ih_b - ih_a + 1);
  }
  return r;
}

// Broadcast mode works on bands of output rows: input rows read about kBandInputBytes (a quarter of an L2), and
// at most kBandTablePointers source pointers.
constexpr int64_t kBandInputBytes = 256 * 1024;
constexpr int64_t kBandTablePointers = 32 * 1024;

// Output rows per band in broadcast mode (see blocked_rows).
template <typename scalar_t>
inline int64_t broadcast_band_rows(const ConvGeom& g) {
  const int64_t in_bytes_per_row = std::max<int64_t>(1, g.stride_h * g.W * g.C_in * int64_t(sizeof(scalar_t)));
  const int64_t pointers_per_row = std::max<int64_t>(1, g.OW * g.KH * g.KW);
  return std::clamp<int64_t>(std::min(kBandInputBytes / in_bytes_per_row, kBandTablePointers / pointers_per_row), 1,
                             kMaxBandImages - 1);
}

// Elements of one group's part of the packed copy of a band's input (broadcast mode with groups > 1): each output
// row reads at most stride_h new input rows, each image of the band adds its kernel's halo, and one pixel of zeros
// at the end is where the group's out-of-image taps point.
template <typename scalar_t>
inline int64_t broadcast_packed_group_elements(const ConvGeom& g) {
  const int64_t band = broadcast_band_rows<scalar_t>(g);
  const int64_t rows = band * g.stride_h + (band + 1) * (int64_t(g.KH - 1) * g.dil_h + 1);
  return (rows * g.W + 1) * (g.C_in / g.groups);
}

// Elements of the whole packed copy, every group's part (0 without groups: no copy).
template <typename scalar_t>
inline int64_t broadcast_packed_elements(const ConvGeom& g) {
  return g.groups == 1 ? 0 : g.groups * broadcast_packed_group_elements<scalar_t>(g);
}

// Computes output rows [row_begin, row_end) (row = n * OH + oh) with blocks of NV vectors. Expand mode goes row
// by row (the cached expanded rows serve every channel block). Broadcast mode goes band of rows by band of rows,
// and within a band channel block by channel block: a block's weights (up to 9 * 32 * 32 floats at ResNeXt-50's
// last stage) then stay in cache for all the band's rows instead of being streamed again for each row, the band's
// input rows stay in L2 for all the channel blocks, and the source pointers are computed once per band.
template <class V, int NV, bool EXPAND, typename scalar_t>
RK_ALWAYS_INLINE void blocked_rows(const BlockedProblem<scalar_t>& P, BlockedScratch& S, int64_t row_begin,
                                   int64_t row_end) {
  constexpr int CB = NV * V::kLanes;
  constexpr int TP = pixels_per_block<V, NV>();
  const ConvGeom& g = *P.g;
  const int64_t taps = int64_t(g.KH) * g.KW;
  bool row_ok[kMaxBlockedKernel];
  const float* rows[kMaxBlockedKernel];
  // row_ok[kh]: whether tap row kh of output row `row` is inside the image (or, merged, of any of several rows).
  const auto set_row_ok = [&](int64_t row, bool merge = false) {
    const int64_t ih0 = (row % g.OH) * g.stride_h - g.pad_h;
    for (int32_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = ih0 + int64_t(kh) * g.dil_h;
      row_ok[kh] = (merge && row_ok[kh]) || (ih >= 0 && ih < g.H);
    }
  };
  if constexpr (EXPAND) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      set_row_ok(row);
      const int64_t n = row / g.OH, ih0 = (row % g.OH) * g.stride_h - g.pad_h;
      for (int64_t tile = 0; tile < P.n_tiles; ++tile) {
        const int64_t iw0 = tile * P.tile_ow * g.stride_w - g.pad_w;
        for (int32_t kh = 0; kh < g.KH; ++kh) {
          if (row_ok[kh]) rows[kh] = expanded_row<V>(P, S, n, ih0 + int64_t(kh) * g.dil_h, tile, iw0);
        }
        for (int64_t co0 = 0; co0 < g.C_out; co0 += CB) expand_tile_channels<V, NV>(P, S, row, tile, co0, row_ok, rows);
      }
    }
  } else {
    const int64_t band = broadcast_band_rows<scalar_t>(g);
    const int64_t cpg_in = g.C_in / g.groups, cpg_out = g.C_out / g.groups;
    // With groups, the band's input is first copied into S.packed, one part per group ([group][row][iw][cpg_in], see
    // broadcast_packed_group_elements), and the table points into group 0's part; a channel block adds its group's
    // offset (the microkernel's src_offset). In place, a band's pixels are C_in elements apart (4 KB at 1024
    // channels), so the 30-odd pixels one block of a stride-2 row reads fell into one or two L1 sets and were
    // refetched from L2 for every input channel. Interleaved A/B (N=8, 2 threads): 1.10-1.12x faster at ResNeXt-50
    // stage 4's stride-2 block, 1.02-1.16x at stage 3's. The copy reads the band pixel by pixel, in memory order:
    // copied one group at a time, each of its pixels was a line 2-4 KB from the last, which no prefetcher follows
    // across pages, and the copy took 41% of the kernel's samples at ResNeXt-50 stage 3's stride-2 block (Zen 3).
    scalar_t* packed = static_cast<scalar_t*>(S.packed);
    const int64_t group_elems = packed ? broadcast_packed_group_elements<scalar_t>(g) : 0;
    const scalar_t* zeros = packed ? packed + group_elems - cpg_in : P.zero_input;
    if (packed) {
      for (int64_t grp = 1; grp <= g.groups; ++grp) {
        std::fill_n(packed + grp * group_elems - cpg_in, cpg_in, scalar_t(0));  // the parts' zero pixels
      }
    }
    for (int64_t b0 = row_begin; b0 < row_end; b0 += band) {
      const int64_t b1 = std::min(row_end, b0 + band);
      if (packed) {
        const BandInputRows in_rows = band_input_rows(g, b0, b1);
        for (int64_t n = in_rows.n0; n <= in_rows.n1; ++n) {
          const int64_t i = n - in_rows.n0;
          for (int64_t r = 0; r < in_rows.base[i + 1] - in_rows.base[i]; ++r) {
            const scalar_t* src_row = P.in + ((n * g.H + in_rows.first_ih[i] + r) * g.W) * g.C_in;
            scalar_t* dst_row = packed + (in_rows.base[i] + r) * g.W * cpg_in;
            for (int64_t iw = 0; iw < g.W; ++iw) {
              for (int64_t grp = 0; grp < g.groups; ++grp) {
                copy_channels(src_row + iw * g.C_in + grp * cpg_in, dst_row + grp * group_elems + iw * cpg_in, cpg_in);
              }
            }
          }
        }
        broadcast_source_table(P, S.src, b0, b1, zeros, [&](int64_t n, int64_t ih, int64_t iw) {
          const int64_t i = n - in_rows.n0;
          return packed + ((in_rows.base[i] + ih - in_rows.first_ih[i]) * g.W + iw) * cpg_in;
        });
      } else {
        broadcast_source_table(P, S.src, b0, b1, zeros, [&](int64_t n, int64_t ih, int64_t iw) {
          return P.in + ((n * g.H + ih) * g.W + iw) * g.C_in;
        });
      }
      // The band's pixels (rows b0..b1 are consecutive in the output, and so are their table entries) go in equal
      // blocks of up to TP that may span rows: 7-pixel rows in bands of two go as 5 + 5 + 4 rather than 4 + 3 + 4
      // + 3, and no row ends in a 1-pixel block (which loads its weights for one pixel's multiply-adds). A block's
      // taps are skipped only where they are outside the image for every row it spans; the table points the other
      // out-of-image taps at zeros.
      const int64_t npix = (b1 - b0) * g.OW, nblocks = (npix + TP - 1) / TP, per_block = (npix + nblocks - 1) / nblocks;
      scalar_t* out_band = P.out + b0 * g.OW * g.C_out;
      for (int64_t co0 = 0; co0 < g.C_out; co0 += CB) {
        const int64_t grp = co0 / cpg_out;  // the block's group
        const int64_t src_ch0 = packed ? grp * group_elems : grp * cpg_in;
        for (int64_t p0 = 0; p0 < npix; p0 += per_block) {
          const int np = int(std::min<int64_t>(per_block, npix - p0));
          const int64_t r0 = b0 + p0 / g.OW, r1 = b0 + (p0 + np - 1) / g.OW;
          for (int64_t r = r0; r <= r1; ++r) set_row_ok(r, r > r0);
          scalar_t* out = out_band + p0 * g.C_out + co0;
          microkernel_tail<V, NV, TP, false>(np, P, row_ok, S.src + p0 * taps, src_ch0, block_weights(P, co0),
                                             P.shift + co0, out);
        }
        if (P.row_stats) {  // per row, over the band's rows for these channels at once (still in L1)
          for (int64_t r = b0; r < b1; ++r) {
            accumulate_row_stats_at<V, NV>(P, out_band + (r - b0) * g.OW * g.C_out + co0, r, 0, co0, int(g.OW));
          }
        }
      }
    }
  }
}

template <class V, typename scalar_t>
RK_ALWAYS_INLINE void blocked_rows_dispatch(const BlockedProblem<scalar_t>& P, BlockedScratch& S, int nv,
                                            int64_t row_begin, int64_t row_end) {
#define RK_BLOCKED_CASE(NV)                                                      \
  case NV:                                                                       \
    if (P.expand)                                                                \
      blocked_rows<V, NV, true>(P, S, row_begin, row_end);                       \
    else                                                                         \
      blocked_rows<V, NV, false>(P, S, row_begin, row_end);                      \
    break;
  switch (nv) {
    RK_BLOCKED_CASE(4)
    RK_BLOCKED_CASE(2)
    RK_BLOCKED_CASE(1)
    default:
      break;
  }
#undef RK_BLOCKED_CASE
}

}  // namespace cpu
}  // namespace rk
